"""Lossless speculative Jacobi decoding (SJD, arXiv 2410.01699) over the GPT's per-row KV cache.

One call verifies a whole window: the window holds each row's last committed token and ``window - 1`` drafts, one
cached forward with ``S_q = window`` gives the target distribution p at every window position (guidance, temperature,
top-k and top-p applied exactly as plain sampling), and the drafts are checked left to right with the speculative
sampling test: draft x (drawn from a known q) is accepted with probability ``min(1, p(x) / q(x))``; the first
rejected position is resampled from ``norm(max(p - q, 0))``; when all drafts pass, the last position's p gives a
bonus token. So every call commits between 1 and ``window`` tokens, and each committed token has exactly the
autoregressive conditional distribution (the standard speculative-sampling argument: a draft is verified only under
a context made of committed tokens, its q is a function of the past, and its randomness is fresh).

The Jacobi update: positions after the newly committed token are redrafted from this call's p at those positions
(computed under the old, now stale drafts -- a valid q all the same, since it is known and the draw is fresh), and
each draft's q is remembered for its verification. Positions past the old window are drafted fresh
(``init``): ``"random"`` (uniform q), ``"prior"``, the spatial prior: the token above (the token to the left on
the first image row), or ``"left"``, the token to the left (so every fresh draft repeats the last known token),
each drafted deterministically, i.e. q a point mass on it -- a well-defined q for which the test accepts with
probability p(prior token) and the residual is p with that token removed. ``"prior-reset"`` / ``"left-reset"``
drop the Jacobi redraft: after every call the whole window is drafted afresh from that prior of the new committed
prefix (the prior as a draft model; Jacobi redrafts come from p under stale drafts, which is poor where each token
depends on its left neighbour, as in stripes and checkerboards). ``"adaptive"`` (the default, chosen by
measurement: benchmarks/results/spec_bench_shipped_*): per row, the raster offset among left, above, above-left,
above-right, two left, two above whose copies agree most often with that row's committed tokens; fresh drafts copy
from it, and where that agreement is at least ``ADAPTIVE_TRUST`` the whole window is redrafted from it after every
call (reset), elsewhere by Jacobi. Every choice is a function of committed tokens, so each q stays known.

Rollback is free: a call writes K/V at cache rows ``cache_seqlens .. cache_seqlens + window - 1`` (the decode
kernel's append), but ``cache_seqlens`` advances only by the committed count, so the rows of rejected drafts lie
past every row's length, are never attended to, and the next call's append overwrites them before they could be
read. Each row advances by its own count (per-sample progress, not SJD's batch minimum); finished rows stop
changing (their calls still run, on static shapes, but commit nothing).

Everything in the step is device tensor arithmetic on buffers allocated once (window tokens, q of every draft, the
token sequence, committed counts, cache lengths, the :class:`~models.sampling.generate.DeviceRNG` stream): no host
synchronisation, so the step is CUDA-graph capturable and ``torch.compile(fullgraph=True)``-traceable; the host
reads one boolean (all rows done?) every ``check_every`` calls.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .generate import DeviceRNG, filter_logits, seed_from

INITS = ("prior", "left", "random", "prior-reset", "left-reset", "adaptive")
# "adaptive": copy from the raster offset whose copies agree best with the committed tokens so far
ADAPTIVE_TRUST = 0.8  # agreement at or above which the window is redrafted from that offset instead of by Jacobi


class JacobiStep:
    """One SJD call over static buffers; see the module docstring. ``rule`` is for tests only: ``"exact"`` is the
    lossless rule, ``"accept_always"``, ``"resample_p"`` (resample from p instead of the residual) and
    ``"reset_keeps_q"`` (reset drafts verified against the q of the drafts they replaced) are the broken variants the
    losslessness test must reject."""

    def __init__(self, model, batch: int, *, window: int, guided: bool, cfg_scale: float, cfg_interval: float,
                 temperature: float, top_k: int, top_p: float, rng: DeviceRNG, init: str, device,
                 rule: str = "exact"):
        config = model.config
        self.model, self.batch, self.window, self.guided = model, batch, window, guided
        self.cfg_scale, self.cfg_interval = cfg_scale, cfg_interval
        self.temperature, self.top_k, self.top_p, self.rng = temperature, top_k, top_p, rng
        # "<init>-reset": no Jacobi redraft; after every call the whole window is drafted afresh from the spatial
        # prior of the new committed prefix (the prior as a draft model).
        self.init, self.reset, self.rule = init.removesuffix("-reset"), init.endswith("-reset"), rule
        self.n_tokens, self.prefix = config.block_size, config.cls_token_num
        self.grid_w, self.vocab = config.grid[1], config.vocab_size
        W, N, V = window, self.n_tokens, self.vocab
        rows = 2 * batch if guided else batch
        # RoPE rows for the window's dead tail: a finished row's window still covers positions up to N + W - 2.
        # Those tokens are never committed, so their rotation is irrelevant; zero rows keep the table's format.
        table = model.rope_table
        pad = self.prefix + N + W - table.shape[0]
        self.rope_table = torch.cat([table, table.new_zeros(pad, *table.shape[1:])]) if pad > 0 else table
        # Committed tokens at [0, n) and the current drafts at [n, n + W - 1); the last column is a write sink for
        # masked scatters (static shapes: a write that must not happen goes there instead of being skipped).
        self.seq = torch.zeros(batch, N + 2 * W, dtype=torch.long, device=device)
        self.sink = self.seq.shape[1] - 1
        self.n = torch.ones(batch, dtype=torch.long, device=device)  # committed tokens (the prefill gives one)
        # q of the draft in window slot j (position n + j); slot W - 1 holds no draft: q = 0 there makes the
        # residual at that slot p itself, the bonus token.
        self.q = torch.zeros(batch, W, V, device=device)
        self.cache_seqlens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.calls = torch.zeros(batch, dtype=torch.int32, device=device)  # calls until each row finished
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self.arange_w = torch.arange(W, device=device)
        gw = self.grid_w
        # Adaptive prior's candidates, as raster offsets: left, above, above-left, above-right, two left, two above.
        self.offsets = torch.tensor([1, gw, gw + 1, gw - 1, 2, 2 * gw], device=device)
        self.conf = torch.zeros(batch, device=device)  # adaptive: the chosen offset's agreement

    # -- distributions ------------------------------------------------------------------------------------------

    def target(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(rows, S, V) fp32 logits of positions ``pos`` (B, S) -> (B, S, V) target probabilities: guidance per
        absolute position (``cfg_interval`` as :func:`models.sampling.generate.guided_at`), then temperature, top-k, top-p
        (temperature 0: a point mass on the argmax)."""
        if self.guided:
            cond, uncond = logits.chunk(2)
            guided = uncond + self.cfg_scale * (cond - uncond)
            on = (pos - 1 <= self.cfg_interval) | (pos == 0) if self.cfg_interval > -1 else torch.ones_like(pos, dtype=torch.bool)
            logits = torch.where(on[..., None], guided, cond)
        if self.temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        shape = logits.shape
        filtered = filter_logits((logits / self.temperature).reshape(-1, shape[-1]), self.top_k, self.top_p)
        return filtered.softmax(-1).view(shape)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """A token from each distribution in ``probs`` (..., V) by Gumbel-max (zero-probability tokens never win:
        log 0 = -inf and the noise is finite)."""
        gumbel = -torch.log(-torch.log(self.rng.uniform(probs.shape)))
        return (probs.log() + gumbel).argmax(-1)

    def fresh(self, first: torch.Tensor):
        """Drafts for positions ``first + k`` (k = 0 .. W - 2), beyond the old window: (tokens (B, W-1), q (B, W-1,
        V)). Reads ``self.seq`` only below ``first`` (already committed or redrafted)."""
        W, V = self.window, self.vocab
        pos = first[:, None] + self.arange_w[: W - 1]
        if self.init == "random":
            tokens = (self.rng.uniform(pos.shape) * V).long().clamp_(max=V - 1)
            return tokens, torch.full((*pos.shape, V), 1.0 / V, device=pos.device)
        if self.init == "adaptive":
            return self._copy_drafts(pos, first)
        if self.init == "left":
            # The token to the left, chained back to the last known one (first - 1): every fresh draft repeats it.
            tokens = self.seq.gather(1, (first - 1)[:, None].expand(-1, W - 1))
            return tokens, torch.nn.functional.one_hot(tokens, V).float()
        # Spatial prior: the token above, followed upward until it lands below `first` (so it is known); on the
        # first image row the token to the left, which chains back to first - 1.
        above = pos - self.grid_w * torch.div(pos - first[:, None] + self.grid_w, self.grid_w, rounding_mode="floor")
        ref = torch.where((pos >= self.grid_w) & (above >= 0), above, first[:, None] - 1)
        tokens = self.seq.gather(1, ref)
        return tokens, torch.nn.functional.one_hot(tokens, V).float()

    def _copy_drafts(self, pos: torch.Tensor, first: torch.Tensor):
        """Adaptive prior: per row, the offset d (of ``self.offsets``) whose copies ``seq[t - d] == seq[t]`` agree
        most often over the committed tokens t < n (a function of the committed tokens alone, so a valid q); each
        draft copies the token d back, chained back by d until it lands below ``first``; ``self.conf`` = that
        agreement."""
        N, V = self.n_tokens, self.vocab
        t = torch.arange(self.seq.shape[1], device=pos.device)
        src = t[None, :] - self.offsets[:, None]  # (C, L)
        same = self.seq[:, None, :] == self.seq[:, src.clamp(min=0)]  # (B, C, L)
        valid = (src >= 0)[None] & (t[None, None, :] < self.n[:, None, None].clamp(max=N))
        agree = (same & valid).sum(-1) / valid.sum(-1).clamp(min=1)  # (B, C)
        conf, best = agree.max(-1)
        self.conf.copy_(conf)  # a static buffer, like all step state (CUDA-graph replays write it in place)
        d = self.offsets[best][:, None]
        ref = pos - d * (torch.div(pos - first[:, None], d, rounding_mode="floor") + 1)
        ref = torch.where(ref >= 0, ref, first[:, None] - 1)
        tokens = self.seq.gather(1, ref)
        return tokens, torch.nn.functional.one_hot(tokens, V).float()

    # -- the model call -----------------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (rows, S) at cache rows ``cache_seqlens ..`` -> logits (rows, S, V) at every position (the
        GPT's ``decode_step`` keeps only the last)."""
        m = self.model
        x = m.tok_embeddings(tokens)
        for layer in m.layers:
            x = layer.forward_decode(x, self.rope_table, self.cache_seqlens)
        return m.output(m.norm(x)).float()

    def prefill(self, cond_labels: torch.Tensor) -> None:
        """Class prefix -> the first token (from p, as plain sampling) and the first window's drafts."""
        m = self.model
        x = m.cls_embedding(cond_labels, train=False)[:, : self.prefix]
        for layer in m.layers:
            x = layer.forward_decode(x, self.rope_table, self.cache_seqlens)
        logits = m.output(m.norm(x[:, -1:])).float()
        p = self.target(logits, torch.zeros(self.batch, 1, dtype=torch.long, device=logits.device))
        self.seq[:, 0] = self.draw(p[:, 0])
        self.cache_seqlens += self.prefix
        tokens, q = self.fresh(self.n)
        self.seq[:, 1: self.window] = tokens
        self.q[:, : self.window - 1] = q

    def __call__(self) -> None:
        W, N = self.window, self.n_tokens
        n = self.n
        j = self.arange_w
        live = n < N
        self.calls += live.int()
        window = self.seq.gather(1, n[:, None] - 1 + j)  # last committed token, then W - 1 drafts
        rows = window.repeat(2, 1) if self.guided else window
        p = self.target(self.forward(rows), n[:, None] + j)  # p[:, i] is the distribution of token n + i
        drafts = window[:, 1:]
        q = self.q
        # Left-to-right verification: accept draft j with probability min(1, p/q) <=> u * q < p (u in (0, 1)).
        pd = p[:, : W - 1].gather(-1, drafts[..., None]).squeeze(-1)
        qd = q[:, : W - 1].gather(-1, drafts[..., None]).squeeze(-1)
        accept = self.rng.uniform(pd.shape) * qd < pd
        if self.rule == "accept_always":
            accept = torch.ones_like(accept)
        r = accept.long().cumprod(-1).sum(-1)  # accepted drafts, 0 .. W - 1
        # The token at slot r: the residual norm(max(p - q, 0)) after a rejection, p itself (q = 0) as the bonus.
        p_r = p.gather(1, r[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
        q_r = q.gather(1, r[:, None, None].expand(-1, 1, q.shape[-1])).squeeze(1)
        residual = (p_r - q_r).clamp_(min=0)
        mass = residual.sum(-1, keepdim=True)
        # p == q (to rounding) makes a rejection a zero-probability event; should rounding produce one, p is the
        # exact conditional there.
        residual = torch.where(mass > 0, residual, p_r)
        if self.rule == "resample_p":
            residual = p_r
        new = self.draw(residual)
        # Commit slots 0 .. r (drafts, then the new token), clipped at the image's end; finished rows commit none.
        count = torch.minimum(r + 1, (N - n).clamp(min=0))
        committed = torch.where(j < r[:, None], torch.cat([drafts, drafts[:, :1]], 1), new[:, None])
        self.seq.scatter_(1, torch.where(j < count[:, None], n[:, None] + j, self.sink), committed)
        n_new = n + count
        # Jacobi redraft: slots r + 1 .. W - 1 of this call (positions n + r + 1 .. n + W - 1) from this call's p,
        # those q remembered; then fresh drafts for positions n + W .. (they may read the redrafts: spatial prior).
        jacobi = self.draw(p)
        self.seq.scatter_(1, torch.where((j > r[:, None]) & live[:, None], n[:, None] + j, self.sink), jacobi)
        first = n + W
        fresh_tokens, fresh_q = self.fresh(first)
        k = j[: W - 1]
        self.seq.scatter_(1, torch.where((k < r[:, None]) & live[:, None], first[:, None] + k, self.sink),
                          fresh_tokens)
        # New window slot s (position n_new + s) = old slot r + 1 + s: this call's p, or fresh beyond it.
        slot = (r[:, None] + 1 + k)[..., None].expand(-1, -1, q.shape[-1])
        new_q = torch.cat([p, fresh_q], 1).gather(1, slot)
        self.q[:, : W - 1] = torch.where(live[:, None, None], new_q, q[:, : W - 1])
        if self.reset or self.init == "adaptive":
            # Overwrites the redrafts above: the new window's drafts from the prior (reads only committed tokens
            # below n_new, then the chain it builds); its point-mass q replaces the remembered ones. Adaptive: only
            # in rows whose best offset agrees often enough with their committed tokens (Jacobi elsewhere).
            self.n.copy_(n_new)
            reset_tokens, reset_q = self.fresh(n_new)
            redo = live if self.reset else live & (self.conf >= ADAPTIVE_TRUST)
            self.seq.scatter_(1, torch.where(redo[:, None], n_new[:, None] + k, self.sink), reset_tokens)
            if self.rule != "reset_keeps_q":
                self.q[:, : W - 1] = torch.where(redo[:, None, None], reset_q, self.q[:, : W - 1])
        self.n.copy_(n_new)
        self.cache_seqlens += (count.repeat(2) if self.guided else count).int()
        self.done.copy_((n_new >= N).all())

    def snapshot(self):
        return [t.clone() for t in self._state()]

    def restore(self, saved) -> None:
        for t, s in zip(self._state(), saved):
            t.copy_(s)

    def _state(self):
        return [self.seq, self.n, self.q, self.cache_seqlens, self.calls, self.done, self.rng.counter]


def _capture(step: JacobiStep):
    """``step`` captured in a CUDA graph (warm-up on a side stream, every state buffer restored after the warm-up
    and the capture so the replays do what eager steps would); None, with a warning, when capture fails."""
    try:
        saved = step.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        step.restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        step.restore(saved)
        return graph.replay
    except Exception as exc:
        warnings.warn(f"CUDA graph capture of the speculative step failed ({type(exc).__name__}: {exc}); "
                      "decoding eagerly")
        return None


@torch.no_grad()
def speculative_generate(model, labels: torch.Tensor, n_tokens: int, *, window: int = 16, init: str = "adaptive",
                         cfg_scale: float = 1.0, cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                         cuda_graph: Optional[bool] = None, check_every: int = 4, return_stats: bool = False,
                         _rule: str = "exact"):
    """SJD sampling of ``n_tokens`` image tokens per label (called by :func:`models.sampling.generate.generate` with
    ``speculative="jacobi"``, which validates the arguments). Returns int64 tokens ``(B, n_tokens)``, and with
    ``return_stats`` also a dict: ``calls`` (model calls per row until it finished, prefill excluded), ``steps``
    (window calls run for the batch)."""
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"generate: window must be an int >= 2 (the last token + at least one draft), got {window!r}")
    if init not in INITS:
        raise ValueError(f"generate: speculative init must be one of {INITS}, got {init!r}")
    config = model.config
    model.eval()
    device = model.output.weight.device
    labels = labels.to(device=device, dtype=torch.long)
    guided = cfg_scale > 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    # The window's append reaches row prefix + N + W - 2 for a finished row (its calls still run).
    model.setup_caches(cond.shape[0], config.cls_token_num + config.block_size + window)
    step = JacobiStep(model, labels.shape[0], window=window, guided=guided, cfg_scale=cfg_scale,
                      cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p,
                      rng=DeviceRNG(seed_from(generator), device), init=init, device=device, rule=_rule)
    # Decoding a prefix of the image: the step's end is the model's H*W (its positions and spatial prior), the
    # caller's n_tokens only where to stop.
    step.n_tokens = n_tokens
    step.prefill(cond)
    run = step
    if n_tokens > 1 and (cuda_graph if cuda_graph is not None else device.type == "cuda"):
        run = _capture(step) or step
    steps = 0
    while steps < n_tokens - 1:  # every call commits >= 1 token per live row: n_tokens - 1 calls always suffice
        run()
        steps += 1
        if steps % check_every == 0 and bool(step.done):
            break
    tokens = step.seq[:, :n_tokens].clone()
    model.clear_caches()
    if return_stats:
        return tokens, {"calls": step.calls.clone(), "steps": steps}
    return tokens
