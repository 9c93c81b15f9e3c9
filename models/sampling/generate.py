"""Sampling: class prefix -> H*W image tokens through the GPT's static KV cache.

A straight line: allocate static caches for every layer, prefill the class prefix (with classifier-free guidance
the batch is doubled: real labels, then the null class), then one decode step per token — cached forward of the
new token, guidance, filtered sampling, cache length advanced — all on the device: no host synchronisation, the
random stream in device state (:class:`DeviceRNG`, seeded from the ``generator``). On a GPU that whole step is captured once in a CUDA graph and
replayed ``H*W - 1`` times (gpt-fast style), so launch and Python overhead vanish; on CPU it runs eagerly (and
``torch.compile(decode_step, fullgraph=True)`` traces it, the stand-in check that it has no host syncs).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) all but the ``top_k`` largest logits and outside the smallest set of tokens whose
    probability reaches ``top_p``; 0 / 1.0 switch a filter off. ``logits`` (B, V) fp32."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens strictly before it already reach top_p. The most likely one always stays,
        # explicitly: for top_p <= 0 the rule alone would drop it too (0 >= 0), leaving only -inf (then argmax
        # picks token 0); LlamaGen keeps it, so top_p = 0 is greedy.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


_MASK32 = 0xFFFFFFFF


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """An integer mixing function on int64 tensors holding 32-bit values (products stay below 2^63), in place:
    the sampler hashes one value per vocabulary entry per row, and on CPU the temporaries of an out-of-place form
    cost as much as the arithmetic."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """:func:`_hash32_` on a copy."""
    return _hash32_(x.clone())


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """32-bit values (int64 tensor) -> fp32 uniforms strictly inside (0, 1).

    The top 23 bits ``k`` map to ``(k + 0.5) / 2^23``: ``k + 0.5`` has at most 24 significant bits, so every step
    is exact in fp32 and the extremes are ``2^-24`` and ``1 - 2^-24``. (Keeping 24 bits, ``(k + 0.5) / 2^24``
    needs 25 significant bits and rounds ``k = 2^24 - 1`` to exactly 1.0: Gumbel noise +inf, which samples a token
    whatever its probability, even one the top-k/top-p filter removed.)"""
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


class DeviceRNG:
    """A counter-based random stream whose whole state is two device tensors (key, counter): drawing is plain
    tensor arithmetic, so it is CUDA-graph capturable and traceable by torch.compile (a ``torch.Generator`` is
    neither), and reproducible from its seed on any device."""

    def __init__(self, seed: int, device):
        self.key = torch.tensor(seed & _MASK32, dtype=torch.int64, device=device)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)

    def uniform(self, shape) -> torch.Tensor:
        """fp32 uniform samples in (0, 1); advances the stream."""
        self.counter += 1
        index = torch.arange(torch.Size(shape).numel(), device=self.key.device).view(shape)
        index ^= _hash32(self.key ^ _hash32(self.counter & _MASK32))
        return bits_to_uniform(_hash32_(index))


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                rng: Optional[DeviceRNG]) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) int64 tokens: a draw from softmax(filtered logits / temperature) by the
    Gumbel-max trick on ``rng``'s uniforms. temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    # LlamaGen's top-k keeps every token whose logit reaches the k-th largest value, so a tie at the k-th value
    # keeps more than k tokens (common with bf16 logits at vocab 16384: 8 mantissa bits); hence the mask over the
    # whole vocabulary rather than noise on torch.topk's k survivors, which would keep exactly k and pick among the
    # tied ones by position. A removed (-inf) token cannot win: the Gumbel noise is finite everywhere.
    return (filter_logits(logits, top_k, top_p) + _gumbel(rng, logits.shape)).argmax(-1)


def _gumbel(rng: DeviceRNG, shape) -> torch.Tensor:
    """Standard Gumbel noise, finite everywhere because the uniforms lie strictly inside (0, 1): a filtered
    (-inf) logit stays -inf after the noise is added."""
    return rng.uniform(shape).log_().neg_().log_().neg_()


def seed_from(generator: Optional[torch.Generator]) -> int:
    """A seed for :class:`DeviceRNG` drawn (once, before decoding) from ``generator`` or torch's global RNG."""
    if generator is None:
        return int(torch.randint(0, 2**31 - 1, (1,)))
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


class DecodeStep:
    """One sampling step over static buffers: ``step_tokens`` (B2, 1) in, logits -> guided sample -> ``next_tokens``
    (B,) out, ``step_tokens`` refilled and ``cache_seqlens`` advanced in place. Every tensor it touches is
    allocated once, which is what lets a CUDA graph replay it."""

    def __init__(self, model, batch: int, guided: bool, cfg_scale: float, sampling: dict, device):
        self.model, self.batch, self.guided, self.cfg_scale, self.sampling = model, batch, guided, cfg_scale, sampling
        rows = 2 * batch if guided else batch
        self.step_tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.cache_seqlens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        # Guidance on/off as device state (LlamaGen's cfg_interval switches it off mid-sequence): a captured graph
        # reads it at every replay, and the host flips it between replays with a fill_, no recapture.
        self.cfg_on = torch.ones((), dtype=torch.bool, device=device)

    def guide(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return logits
        cond_logits, uncond_logits = logits.chunk(2)
        guided = uncond_logits + self.cfg_scale * (cond_logits - uncond_logits)
        # Off: the conditional logits themselves, as LlamaGen (not u + 1 * (c - u), which rounds differently).
        return torch.where(self.cfg_on, guided, cond_logits)

    def sample(self, logits: torch.Tensor) -> None:
        """Sample from (B2, V) logits into ``next_tokens`` and ``step_tokens`` (both CFG halves get the token)."""
        self.next_tokens.copy_(sample_next(self.guide(logits), **self.sampling))
        self.step_tokens.copy_(self.next_tokens.repeat(2 if self.guided else 1)[:, None])

    def prefill(self, cond_labels: torch.Tensor) -> None:
        self.sample(self.model.decode_step(None, cond_labels, self.cache_seqlens))
        self.cache_seqlens += self.model.config.cls_token_num

    def __call__(self) -> None:
        logits = self.model.decode_step(self.step_tokens, None, self.cache_seqlens)
        self.cache_seqlens += 1
        self.sample(logits)


def _capture(step: DecodeStep):
    """``step`` captured in a CUDA graph; returns its replay, or None (with a warning) when capture fails."""
    try:
        seqlens, counter = step.cache_seqlens.clone(), step.sampling["rng"].counter.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy init and kernel compilation happen outside the capture
            step()
        torch.cuda.current_stream().wait_stream(side)
        step.cache_seqlens.copy_(seqlens)  # the warm-up's cache writes land on rows the real steps overwrite
        step.sampling["rng"].counter.copy_(counter)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        step.cache_seqlens.copy_(seqlens)
        step.sampling["rng"].counter.copy_(counter)  # the replays draw what the eager steps would have drawn
        return graph.replay
    except Exception as exc:  # a host sync somewhere in the step: fall back to eager, loudly
        warnings.warn(f"CUDA graph capture of the decode step failed ({type(exc).__name__}: {exc}); "
                      "decoding eagerly")
        return None


def guided_at(t: int, cfg_interval) -> bool:
    """LlamaGen's ``cfg_interval`` rule: token ``t`` (0-based) is sampled with guidance iff ``cfg_interval <= -1``
    (off: always guided), ``t == 0`` (the prefill), or ``t - 1 <= cfg_interval`` (LlamaGen's decode loop index
    ``i = t - 1`` switches guidance off for good once ``i > cfg_interval``)."""
    return not cfg_interval > -1 or t == 0 or t - 1 <= cfg_interval


@torch.no_grad()
def generate(model, cond: torch.Tensor, max_new_tokens: Optional[int] = None, emb_masks=None,
             cfg_scale: float = 1.0, cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, sample_logits: bool = True, *, generator: Optional[torch.Generator] = None,
             cuda_graph: Optional[bool] = None, speculative: Optional[str] = None, window: int = 16,
             draft_init: str = "adaptive") -> torch.Tensor:
    """Sample image tokens per class label; LlamaGen's ``generate`` call works as it is.

    ``generate(model, cond, max_new_tokens, emb_masks=None, cfg_scale=1.0, cfg_interval=-1, temperature=1.0,
    top_k=0, top_p=1.0, sample_logits=True)`` is LlamaGen's signature (its ``sample_c2i.py`` call runs
    unchanged); ``generate(model, labels, cfg_scale=...)`` is the short form our CLIs use.

    Arguments:
        model: a :class:`models.nets.gpt.GPT` (put in eval mode here; its caches are (re)allocated).
        cond: ``(B,)`` int class labels (LlamaGen's ``c_indices``); class-conditional only.
        max_new_tokens: tokens to sample, ``1 .. H*W`` (default ``H*W``). Given (LlamaGen's call), the tokens come
            back as ``torch.int`` as LlamaGen returns them; omitted, as int64.
        emb_masks: LlamaGen's condition-token mask (t2i padding); for a class token only None or all-ones is
            meaningful, anything else is refused (the decode kernel has no per-key mask).
        cfg_scale: classifier-free guidance scale; ``> 1`` doubles the batch (cond + null class) and samples from
            ``uncond + cfg_scale * (cond - uncond)``; ``1`` samples the conditional model alone.
        cfg_interval: LlamaGen's: ``-1`` guides every token; ``n >= 0`` guides tokens ``0 .. n + 1`` and samples
            the rest from the conditional logits alone (see :func:`guided_at`).
        temperature, top_k, top_p: sampling filters (LlamaGen defaults: 1.0, off, off); temperature 0 = greedy;
            ``top_p = 0`` keeps the most likely token (greedy), as LlamaGen.
        sample_logits: LlamaGen's flag: False = greedy (argmax of the filtered logits).
        generator: seeds the sampler (one draw, before decoding) for reproducible samples; the per-step randomness
            is a :class:`DeviceRNG` on the model's device (graph- and compile-safe).
        cuda_graph: capture the decode step in a CUDA graph (default: on for CUDA models).
        speculative: ``None`` = one model call per token; ``"jacobi"`` = lossless speculative Jacobi decoding
            (:mod:`models.sampling.speculative`): the same distribution in fewer calls, ``window`` tokens verified per call
            (``window - 1`` drafts, initialised by ``draft_init``: ``"adaptive"``, the default, copies from the
            neighbour offset that agrees best with the tokens so far; ``"prior"`` the token above, ``"left"`` the
            token to the left, ``"random"``; see :mod:`models.sampling.speculative`).
    Return:
        tokens: ``(B, max_new_tokens)`` raster order; ``torch.int`` when ``max_new_tokens`` is passed, else int64.
    """
    config = model.config
    if not isinstance(cond, torch.Tensor) or cond.dim() != 1 or cond.is_floating_point():
        raise ValueError(f"generate: cond must be a (B,) tensor of int class labels (this model is class-"
                         f"conditional, c2i; text embeddings / t2i are not supported), got "
                         f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}"
                         f"{' float' if isinstance(cond, torch.Tensor) and cond.is_floating_point() else ''}")
    n_tokens = config.block_size if max_new_tokens is None else int(max_new_tokens)
    if not 1 <= n_tokens <= config.block_size:
        raise ValueError(f"generate: max_new_tokens must be in [1, {config.block_size}] (the model's H*W), "
                         f"got {max_new_tokens}")
    if emb_masks is not None and not bool(torch.as_tensor(emb_masks).bool().all()):
        raise ValueError("generate: emb_masks that mask the class token are not supported (LlamaGen uses them "
                         "for t2i caption padding; a class-conditional prefix has nothing to pad)")
    if not sample_logits:
        temperature = 0.0
    if speculative is not None:
        if speculative != "jacobi":
            raise ValueError(f"generate: speculative must be None or 'jacobi', got {speculative!r}")
        from .speculative import speculative_generate

        tokens = speculative_generate(model, cond, n_tokens, window=window, init=draft_init, cfg_scale=cfg_scale,
                                      cfg_interval=cfg_interval, temperature=temperature, top_k=top_k,
                                      top_p=top_p, generator=generator, cuda_graph=cuda_graph)
        return tokens if max_new_tokens is None else tokens.int()
    model.eval()
    device = model.output.weight.device
    labels = cond.to(device=device, dtype=torch.long)
    guided = cfg_scale > 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    model.setup_caches(cond.shape[0])
    step = DecodeStep(model, labels.shape[0], guided, cfg_scale,
                      dict(temperature=temperature, top_k=top_k, top_p=top_p,
                           rng=DeviceRNG(seed_from(generator), device)), device)
    tokens = torch.empty(labels.shape[0], n_tokens, dtype=torch.long, device=device)

    step.prefill(cond)
    tokens[:, 0] = step.next_tokens
    run = step
    if n_tokens > 1 and (cuda_graph if cuda_graph is not None else device.type == "cuda"):
        run = _capture(step) or step
    for i in range(1, n_tokens):
        if guided and not guided_at(i, cfg_interval):
            step.cfg_on.fill_(False)  # stays off: LlamaGen never switches it back on
        run()
        tokens[:, i] = step.next_tokens
    model.clear_caches()
    return tokens if max_new_tokens is None else tokens.int()
