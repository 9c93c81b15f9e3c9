"""A LlamaGen user's first contact: a sampler that is right, precision casts that work, a drop-in
``ForesightAttention`` inside LlamaGen's own Transformer, LlamaGen's calls, presets and checkpoint layouts.

The LlamaGen-structured model below is written here from LlamaGen's definition (``autoregressive/models/gpt.py``
and ``generate.py``: pre-norm blocks, fused wqkv, 2D RoPE with zero class rows, heads-first static KV cache with
``update(input_pos, k, v)``, a boolean causal mask sliced at ``input_pos``, ``setup_caches`` setting
``attention.kv_cache``), so that our module can be swapped into it and held against the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mirai_kernels as mk
from models.sampling.generate import DeviceRNG, bits_to_uniform, filter_logits, generate, sample_next

# ---------------------------------------------------------------------------------------------------------
# Bug 1: uniforms strictly inside (0, 1); filtered tokens never sampled
# ---------------------------------------------------------------------------------------------------------


def test_uniforms_strictly_inside_unit_interval_for_every_bit_pattern():
    """Exhaustive over the 2^24 values of the top 24 bits (the mapping reads only the top 23), with the low byte
    all zeros and all ones: the old ``((bits >> 8) + 0.5) / 2^24`` rounds ``bits >> 8 = 2^24 - 1`` to 1.0."""
    top = torch.arange(1 << 24, dtype=torch.int64) << 8
    for low in (0x00, 0xFF):
        u = bits_to_uniform(top | low)
        assert u.dtype == torch.float32
        assert float(u.min()) > 0.0 and float(u.max()) < 1.0
        assert torch.isfinite(-torch.log(-torch.log(u))).all()
    assert float(bits_to_uniform(torch.tensor([0]))) == 2.0**-24
    assert float(bits_to_uniform(torch.tensor([0xFFFFFFFF]))) == 1.0 - 2.0**-24


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**32 - 1, -1, 2**40 + 5])
@pytest.mark.parametrize("counter", [0, 2**32 - 2, 2**32 - 1, 2**40])
def test_device_rng_hash_stays_32_bit_for_extreme_keys_and_counters(seed, counter):
    """The stream's bits are 32-bit values for any key and counter (so the exhaustive mapping test covers every
    draw): uniforms in (0, 1) at the extremes."""
    rng = DeviceRNG(seed, "cpu")
    rng.counter.fill_(counter)
    u = rng.uniform((4, 4096))
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0


class _ExtremeRNG:
    """A stand-in stream whose uniforms are the extreme values the mapping can produce (bit patterns 0 and
    2^32 - 1, alternating), through the real :func:`bits_to_uniform`: the worst case for the Gumbel noise."""

    def uniform(self, shape):
        n = torch.Size(shape).numel()
        bits = torch.where(torch.arange(n) % 2 == 0, 0xFFFFFFFF, 0).view(shape)
        return bits_to_uniform(bits)


def test_filtered_tokens_never_sampled_under_extreme_uniforms():
    """Old mapping: u = 1.0 -> Gumbel +inf -> a removed (-inf) token gives NaN and argmax takes it."""
    torch.manual_seed(0)
    logits = torch.randn(64, 16384) * 3
    greedy = logits.argmax(-1)
    for kw in (dict(top_k=1, top_p=1.0), dict(top_k=0, top_p=1e-6), dict(top_k=0, top_p=0.0),
               dict(top_k=5, top_p=0.0)):
        drawn = sample_next(logits, temperature=1.0, rng=_ExtremeRNG(), **kw)
        assert torch.equal(drawn, greedy), kw
    # top-p: every drawn token lies inside the nucleus
    kept = torch.isfinite(filter_logits(logits, 0, 0.5))
    drawn = sample_next(logits, temperature=1.0, top_k=0, top_p=0.5, rng=_ExtremeRNG())
    assert kept.gather(1, drawn[:, None]).all()


def test_top_k_1_sampling_equals_greedy_over_100k_draws():
    """At vocab 16384 about one draw in 1024 escaped top_k=1 when the uniforms could round to 1.0 (docs/method.md,
    "Decoding and sampling"): 100k draws must all be the argmax."""
    torch.manual_seed(0)
    logits = torch.randn(1024, 16384)
    greedy = logits.argmax(-1)
    rng = DeviceRNG(1234, "cpu")
    mismatches = 0
    for _ in range(100):  # 102,400 draws
        mismatches += int((sample_next(logits, temperature=1.0, top_k=1, top_p=1.0, rng=rng) != greedy).sum())
    assert mismatches == 0


def test_top_p_zero_keeps_the_most_likely_token():
    """``--top-p 0`` must be greedy, as in LlamaGen, not 'drop everything, emit token 0'."""
    torch.manual_seed(1)
    logits = torch.randn(32, 100)
    logits[:, 0] = -50  # token 0 is the least likely everywhere: the old result (all -inf -> argmax 0) fails
    masked = filter_logits(logits, 0, 0.0)
    assert (torch.isfinite(masked).sum(-1) == 1).all()
    for top_k in (0, 10):
        drawn = sample_next(logits, temperature=1.0, top_k=top_k, top_p=0.0, rng=DeviceRNG(5, "cpu"))
        assert torch.equal(drawn, logits.argmax(-1))


def test_top_k_draws_follow_the_renormalised_distribution():
    """The survivor-only draw is still a draw from softmax(top-k filtered logits)."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    logits = (probs + 1e-9).log().expand(40000, 5).contiguous()
    draws = sample_next(logits, temperature=1.0, top_k=3, top_p=1.0, rng=DeviceRNG(3, "cpu"))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0, 0]), atol=0.012, rtol=0)


def _llamagen_top_k_probs(logits: torch.Tensor, k: int) -> torch.Tensor:
    """LlamaGen's top-k, from its definition: a token is removed only when its logit is below the k-th largest
    value, so ties at that value all survive; then softmax over the survivors."""
    kth_value = logits.sort(descending=True).values[k - 1]
    return torch.where(logits >= kth_value, logits, torch.tensor(float("-inf"))).double().softmax(-1)


def test_top_k_keeps_every_token_tied_at_the_kth_value():
    """bf16 logits tie often at vocab 16384 (8 mantissa bits); LlamaGen then keeps more than k tokens. Drawing
    from exactly k of them (torch.topk's pick among the tied) never draws the others: tokens 3 and 5 below."""
    row = torch.tensor([3.0, 2.0, 2.0, 2.0, -1.0, 2.0, 0.5, 2.0], dtype=torch.bfloat16).float()
    expected = _llamagen_top_k_probs(row, k=2)
    assert (expected > 0).sum() == 6  # the rule under test: 1 + five tied at the 2nd value
    n = 60000
    draws = sample_next(row.expand(n, -1).contiguous(), temperature=1.0, top_k=2, top_p=1.0, rng=DeviceRNG(11, "cpu"))
    freq = torch.bincount(draws, minlength=8).double() / n
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    # the speculative verifier's target distribution uses filter_logits: the same survivors
    assert torch.equal(torch.isfinite(filter_logits(row[None], top_k=2))[0], expected > 0)


# ---------------------------------------------------------------------------------------------------------
# A LlamaGen-structured Transformer, written from LlamaGen's definition
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LGArgs:
    """The fields of LlamaGen's ``ModelArgs`` that a c2i model reads."""

    dim: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.0
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.0
    ffn_dropout_p: float = 0.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256


def lg_rope_table(grid: int, head_dim: int, base: float, prefix: int) -> torch.Tensor:
    """LlamaGen's 2D table, (prefix + grid^2, head_dim/2, 2): the first half of the pairs rotates with the row
    index, the second with the column, frequencies base^(-2i/(head_dim/2)); zero rows for the class prefix."""
    quarter = head_dim // 4
    inv = 1.0 / (base ** (torch.arange(quarter, dtype=torch.float32) * 2 / (head_dim // 2)))
    rows = torch.arange(grid, dtype=torch.float32)[:, None, None] * inv          # (g, 1, q)
    cols = torch.arange(grid, dtype=torch.float32)[None, :, None] * inv          # (1, g, q)
    angles = torch.cat([rows.expand(grid, grid, quarter), cols.expand(grid, grid, quarter)], -1)
    table = torch.stack([angles.cos(), angles.sin()], -1).reshape(grid * grid, head_dim // 2, 2)
    return torch.cat([torch.zeros(prefix, head_dim // 2, 2), table])


def lg_rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation of x (B, S, H, D) by table rows (S, D/2, 2), in fp32, cast back."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class LGRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LGFeedForward(nn.Module):
    def __init__(self, a: LGArgs):
        super().__init__()
        hidden = int(2 * 4 * a.dim / 3)
        hidden = -(-hidden // a.multiple_of) * a.multiple_of
        self.w1, self.w3 = nn.Linear(a.dim, hidden, bias=False), nn.Linear(a.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, a.dim, bias=False)
        self.ffn_dropout = nn.Dropout(a.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class LGKVCache(nn.Module):
    """Heads-first static cache; ``update`` writes the new rows at ``input_pos`` and returns the whole buffers."""

    def __init__(self, batch, seqlen, heads, head_dim, dtype):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, heads, seqlen, head_dim, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(batch, heads, seqlen, head_dim, dtype=dtype))

    def update(self, input_pos, k, v):
        assert input_pos.shape[0] == k.shape[2]
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class LGAttention(nn.Module):
    def __init__(self, a: LGArgs):
        super().__init__()
        self.dim, self.n_head = a.dim, a.n_head
        self.n_kv_head = a.n_kv_head or a.n_head
        self.head_dim = a.dim // a.n_head
        self.wqkv = nn.Linear(a.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(a.dim, a.dim, bias=False)
        self.kv_cache = None
        self.attn_dropout_p = a.attn_dropout_p
        self.resid_dropout = nn.Dropout(a.resid_dropout_p)

    def forward(self, x, freqs_cis=None, input_pos=None, mask=None):
        b, s, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], -1)
        q = lg_rotate(q.view(b, s, self.n_head, self.head_dim), freqs_cis.reshape(s, -1, 2))
        k = lg_rotate(k.view(b, s, self.n_kv_head, self.head_dim), freqs_cis.reshape(s, -1, 2))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        group = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, s, self.dim)))


class LGBlock(nn.Module):
    def __init__(self, a: LGArgs):
        super().__init__()
        self.attention = LGAttention(a)
        self.feed_forward = LGFeedForward(a)
        self.attention_norm, self.ffn_norm = LGRMSNorm(a.dim, a.norm_eps), LGRMSNorm(a.dim, a.norm_eps)

    def forward(self, x, freqs_cis, start_pos, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, mask)  # LlamaGen's positional call
        return h + self.feed_forward(self.ffn_norm(h))


class LGLabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            labels = torch.where(torch.rand(labels.shape[0]) < self.dropout_prob, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class LGTransformer(nn.Module):
    """LlamaGen's c2i Transformer: forward(idx, cond_idx, input_pos=None, targets=None, mask=None) ->
    (logits, loss); training / full forward when both idx and cond_idx are given, else a cached prefill (cond_idx)
    or decode step (idx) at ``input_pos`` with the causal mask sliced there."""

    def __init__(self, a: LGArgs):
        super().__init__()
        self.config, self.model_type = a, "c2i"
        self.num_classes, self.cls_token_num = a.num_classes, a.cls_token_num
        self.cls_embedding = LGLabelEmbedder(a.num_classes, a.dim, a.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.tok_dropout = nn.Dropout(a.token_dropout_p)
        self.layers = nn.ModuleList(LGBlock(a) for _ in range(a.n_layer))
        self.norm = LGRMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        grid = int(a.block_size ** 0.5)
        self.freqs_cis = lg_rope_table(grid, a.dim // a.n_head, a.rope_base, a.cls_token_num)  # plain attr
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=a.initializer_range)
        # LlamaGen zero-inits the output layer; random here, so that argmax tokens mean something.

    def setup_caches(self, max_batch_size, max_seq_length, dtype):
        max_seq_length = -(-max_seq_length // 8) * 8
        for block in self.layers:
            block.attention.kv_cache = LGKVCache(max_batch_size, max_seq_length, self.config.n_head,
                                                 self.config.dim // self.config.n_head, dtype)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))
        self.causal_mask = self.causal_mask.unsqueeze(0).repeat(max_batch_size, 1, 1)

    def forward(self, idx, cond_idx, input_pos=None, targets=None, mask=None):
        if idx is not None and cond_idx is not None:
            cond = self.cls_embedding(cond_idx, train=self.training)[:, : self.cls_token_num]
            h = self.tok_dropout(torch.cat([cond, self.tok_embeddings(idx)], 1))
        else:
            if cond_idx is not None:
                emb = self.cls_embedding(cond_idx, train=self.training)[:, : self.cls_token_num]
            else:
                emb = self.tok_embeddings(idx)
            mask = self.causal_mask[: emb.shape[0], None, input_pos]
            h = self.tok_dropout(emb)
        freqs = self.freqs_cis[: h.shape[1]] if self.training else self.freqs_cis[input_pos]
        for layer in self.layers:
            h = layer(h, freqs, input_pos, mask)
        logits = self.output(self.norm(h)).float()
        if self.training:
            logits = logits[:, self.cls_token_num - 1:]
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def lg_generate_greedy(model, cond, max_new_tokens, cfg_scale=1.0, cfg_interval=-1):
    """LlamaGen's generate loop (prefill, then one cached step per token, CFG on a doubled batch, cfg_interval),
    greedy: LlamaGen's sample(..., sample_logits=False)."""
    guided = cfg_scale > 1.0
    cond_all = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if guided else cond
    model.setup_caches(cond_all.shape[0], 1 + max_new_tokens, model.tok_embeddings.weight.dtype)

    def pick(logits, flag):
        if guided:
            c, u = logits.chunk(2)
            logits = u + (c - u) * cfg_scale if flag else c
        return logits[:, -1].argmax(-1, keepdim=True)

    tok = pick(model(None, cond_all, torch.arange(0, 1))[0], True)
    out, pos, flag = [tok], torch.tensor([1], dtype=torch.int), True
    for i in range(max_new_tokens - 1):
        if cfg_interval > -1 and i > cfg_interval:
            flag = False
        x = torch.cat([tok, tok]) if guided else tok
        tok = pick(model(x, None, pos)[0], flag)
        pos += 1
        out.append(tok)
    return torch.cat(out, 1).int()


def _swap_in_ours(original: LGTransformer, args) -> LGTransformer:
    ours = LGTransformer(args)
    for block in ours.layers:
        block.attention = mk.ForesightAttention(args)  # LlamaGen's constructor call, nothing else changed
    ours.load_state_dict(original.state_dict(), strict=True)
    return ours


def test_foresight_attention_constructor_forms():
    a = LGArgs(dim=96, n_head=6, n_kv_head=2, resid_dropout_p=0.1, attn_dropout_p=0.05)
    m = mk.ForesightAttention(a)
    assert (m.dim, m.n_head, m.n_kv_head, m.head_dim) == (96, 6, 2, 16)
    assert m.resid_dropout.p == 0.1 and m.attn_dropout_p == 0.05 and m.kv_cache is None
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {n: tuple(p.shape) for n, p in
                                                                     LGAttention(a).named_parameters()}
    f = mk.ForesightAttention(96, 6, 2, attn_dropout_p=0.05, resid_dropout_p=0.1)
    assert {n: p.shape for n, p in f.named_parameters()} == {n: p.shape for n, p in m.named_parameters()}
    with pytest.raises(TypeError, match="dim and n_head"):
        mk.ForesightAttention(object())
    with pytest.raises(TypeError, match="not both"):
        mk.ForesightAttention(a, 6)


def test_drop_in_inside_llamagen_transformer(backend="auto"):
    """Training-mode logits and loss, and cached greedy tokens through LlamaGen's own generate loop (its cache
    object, input_pos and mask), equal the original's at vocab 16384, 256 tokens (the faces are held to the
    reference in their own tests)."""
    torch.manual_seed(0)
    args = LGArgs()
    original = LGTransformer(args)
    ours = _swap_in_ours(original, args)
    idx = torch.randint(0, args.vocab_size, (2, args.block_size - 1))
    labels, targets = torch.tensor([3, 7]), torch.randint(0, args.vocab_size, (2, args.block_size))
    original.train(), ours.train()
    with mk.use_backend(backend):
        torch.manual_seed(1)
        lg_logits, lg_loss = original(idx=idx, cond_idx=labels, targets=targets)
        torch.manual_seed(1)  # same class-dropout draws
        our_logits, our_loss = ours(idx=idx, cond_idx=labels, targets=targets)
        torch.testing.assert_close(our_logits, lg_logits, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(our_loss, lg_loss)
        our_loss.backward()
        assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)

        original.eval(), ours.eval()
        with torch.no_grad():
            want = lg_generate_greedy(original, labels, args.block_size, cfg_scale=4.0)
            got = lg_generate_greedy(ours, labels, args.block_size, cfg_scale=4.0)
    assert want.shape == (2, 256) and len(set(want.flatten().tolist())) > 20, "a degenerate sequence proves little"
    assert torch.equal(got, want)


def test_llamagen_protocol_uses_the_decode_kernel_and_honours_other_masks(monkeypatch):
    """Under LlamaGen's protocol the attention runs in decode_attention over a view of LlamaGen's cache; a mask
    that is not the causal one (t2i padding) is honoured, not ignored."""
    import mirai_kernels.modules as modules

    torch.manual_seed(0)
    args = LGArgs(block_size=16, vocab_size=64)
    attn = mk.ForesightAttention(args).eval()
    reference = LGAttention(args).eval()
    reference.load_state_dict(attn.state_dict())
    table = lg_rope_table(4, 16, 10000, 1)
    calls = []
    real = modules._decode_attention
    monkeypatch.setattr(modules, "_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 5, args.dim)
    for m in (attn, reference):
        m.kv_cache = LGKVCache(3, 16, args.n_head, 16, torch.float32)
    causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))[None].repeat(3, 1, 1)
    pos = torch.arange(5)
    with torch.no_grad():
        ours, theirs = attn(x, table[pos], pos, causal[:, None, pos]), reference(x, table[pos], pos, causal[:, None, pos])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert len(calls) == 1
        pos2 = torch.tensor([5])
        x2 = torch.randn(3, 1, args.dim)
        padded = causal[:, None, pos2].clone()
        padded[0, :, :, 0] = False  # row 0 may not see the class token
        ours, theirs = attn(x2, table[pos2], pos2, padded), reference(x2, table[pos2], pos2, padded)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert len(calls) == 1, "a non-causal mask must not go to the causal decode kernel"
        torch.testing.assert_close(attn.kv_cache.k_cache, reference.kv_cache.k_cache)


def test_bidirectional_keyword_returns_both_outputs():
    torch.manual_seed(0)
    args = LGArgs(block_size=16)
    attn = mk.ForesightAttention(args)
    x = torch.randn(2, 9, args.dim)
    table = lg_rope_table(4, 16, 10000, 1)[:9]
    causal, bidir = attn(x, table, bidirectional=True)
    torch.testing.assert_close(causal, attn(x, table))
    qkv = attn.wqkv(x).view(2, 9, 12, 16)
    q, k, v = lg_rotate(qkv[:, :, :4], table), lg_rotate(qkv[:, :, 4:8], table), qkv[:, :, 8:]
    full = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(bidir, attn.wo(full.transpose(1, 2).reshape(2, 9, -1)), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Our GPT: LlamaGen's calls, precisions, presets
# ---------------------------------------------------------------------------------------------------------


def small_gpt(vocab=64, grid=4, **kw):
    from models.nets.gpt import build_gpt

    torch.manual_seed(0)
    model = build_gpt("tiny", dim=64, n_layer=2, n_head=4, grid=grid, vocab_size=vocab, num_classes=10,
                      token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, **kw)
    nn.init.normal_(model.output.weight, std=0.5)  # LlamaGen zero-inits it: random, so tokens depend on the logits
    return model


def test_forward_unpacks_as_llamagen_and_extras_only_by_keyword():
    model = small_gpt().eval()  # no class dropout: calls compare
    idx, labels, targets = torch.randint(0, 64, (2, 15)), torch.tensor([1, 2]), torch.randint(0, 64, (2, 16))
    out = model(idx, labels, targets)
    assert isinstance(out, tuple) and len(out) == 2
    logits, loss = out
    assert logits.shape == (2, 16, 64) and loss.dim() == 0
    assert model(idx=idx, cond_idx=labels, targets=targets)[1] == loss  # LlamaGen's keyword call
    assert model(idx, labels)[1] is None
    logits2, loss2, extras = model(idx, labels, targets, hidden_layer=1, dual_layer=2)
    assert set(extras) == {"hidden", "bidir_hidden"} and extras["hidden"].shape == (2, 16, 64)
    with pytest.raises(ValueError):
        _, _ = model(idx, labels, targets, hidden_layer=1)  # an extended call cannot silently lose its extras
    logits3, loss3, extras3 = model(idx, labels, stop_at=1, hidden_layer=1)
    assert logits3 is None and loss3 is None and set(extras3) == {"hidden"}


def test_our_decode_goes_through_the_attention_module(monkeypatch):
    """models/nets/gpt.py no longer reaches into attn.wqkv: the cached step is the attention module's call."""
    model = small_gpt().eval()
    seen = []
    for layer in model.layers:
        original = layer.attention.forward
        monkeypatch.setattr(layer.attention, "forward",
                            lambda *a, _f=original, **k: seen.append(k.get("cache_seqlens") is not None) or _f(*a, **k))
    generate(model, torch.tensor([1, 2]), cfg_scale=2.0, temperature=0.0)
    assert seen and all(seen) and len(seen) == 2 * 16
    assert all(layer.attention.kv_cache is None for layer in model.layers), "caches released after sampling"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("face", ["reference", "cpp"])
def test_low_precision_weights_train_and_sample(dtype, face):
    """LlamaGen's sampling script casts the model to bf16 by default: the RoPE table must stay fp32 (exactly the
    table, not a rounded copy) and training and sampling must work."""
    if face not in mk.available_faces("dual_attention", torch.device("cpu")):
        pytest.skip(f"{face} face not built here")
    model = small_gpt()
    fresh = model.rope_table.clone()
    for cast in (lambda m: m.to(dtype), lambda m: m.half().to(dtype), lambda m: m.to(torch.float64).to(dtype)):
        model = cast(model)
        assert model.rope_table.dtype == torch.float32 and torch.equal(model.rope_table, fresh)
    assert model.output.weight.dtype == dtype
    idx, labels, targets = torch.randint(0, 64, (2, 15)), torch.tensor([1, 2]), torch.randint(0, 64, (2, 16))
    with mk.use_backend(face):
        model.train()
        logits, loss = model(idx, labels, targets)
        loss.backward()
        assert torch.isfinite(loss) and model.output.weight.grad.dtype == dtype
        _, _, extras = model(idx, labels, targets, hidden_layer=1, dual_layer=1)
        assert extras["bidir_hidden"].dtype == dtype
        tokens = generate(model, torch.tensor([3, 4]), cfg_scale=2.0, top_k=8,
                          generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64 and 0 <= tokens.min() and tokens.max() < 64


def test_llamagen_presets_and_parameter_counts():
    """LlamaGen's c2i zoo by its names; the counts are LlamaGen's own (its gpt.py comments: 111M ... 3.9B) at
    vocab 16384, 1000 classes + the null class, and equal the closed form of the architecture."""
    from models.nets.gpt import PRESETS, build_gpt, find_multiple

    published = {"GPT-B": (12, 12, 768, 111e6), "GPT-L": (24, 16, 1024, 343e6), "GPT-XL": (36, 20, 1280, 775e6),
                 "GPT-XXL": (48, 24, 1536, 1.4e9), "GPT-XXXL": (48, 40, 2560, 3.9e9), "GPT-3B": (24, 32, 3200, 3.1e9)}
    for name, (n_layer, n_head, dim, count) in published.items():
        assert PRESETS[name]["n_layer"] == n_layer and PRESETS[name]["n_head"] == n_head
        assert PRESETS[name]["dim"] == dim and PRESETS[name].get("n_kv_head", n_head) == n_head
        with torch.device("meta"):
            model = build_gpt(name)
        n = sum(p.numel() for p in model.parameters())
        hidden = find_multiple(int(2 * 4 * dim / 3), 256)
        per_layer = dim * 3 * dim + dim * dim + 3 * dim * hidden + 2 * dim
        assert n == n_layer * per_layer + 1001 * dim + 2 * 16384 * dim + dim, name
        digits = 3 if count < 1e9 else 2
        assert float(f"{n:.{digits}g}") == count, (name, n)


def cache_free_sample(model, labels, n_tokens, cfg_scale, cfg_interval, generator, **sampling):
    """A full forward over the whole prefix at every step (no cache), guidance switched as LlamaGen's decode
    loop does (prefill guided; loop index i = t - 1 turns it off once i > cfg_interval), same random stream."""
    from models.sampling.generate import seed_from

    rng = DeviceRNG(seed_from(generator), "cpu")
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)])
    tokens = torch.zeros(len(labels), 0, dtype=torch.long)
    flag = True
    for t in range(n_tokens):
        if t >= 1 and cfg_interval > -1 and t - 1 > cfg_interval:
            flag = False
        with torch.no_grad():
            logits = model(tokens.repeat(2, 1), cond)[0][:, -1]
        c, u = logits.chunk(2)
        logits = u + cfg_scale * (c - u) if flag else c
        tokens = torch.cat([tokens, sample_next(logits, rng=rng, **sampling)[:, None]], 1)
    return tokens


@pytest.mark.parametrize("cfg_interval", [-1, 0, 4.5])  # 4.5: LlamaGen parses it as a float
def test_generate_accepts_llamagen_call_and_cfg_interval(cfg_interval):
    model = small_gpt().eval()
    labels = torch.arange(16) % 10  # enough rows that guidance on or off at any single step shows in the tokens
    sampling = dict(temperature=1.0, top_k=20, top_p=0.95)
    ours = generate(model, labels, 16, cfg_scale=4.0, cfg_interval=cfg_interval,
                    generator=torch.Generator().manual_seed(2), **sampling)  # LlamaGen's positional call
    assert ours.dtype == torch.int32 and ours.shape == (16, 16)  # LlamaGen returns torch.int
    want = cache_free_sample(model, labels, 16, 4.0, cfg_interval, torch.Generator().manual_seed(2), **sampling)
    assert torch.equal(ours.long(), want)
    if cfg_interval >= 0:  # the switch matters: always-guided sampling differs
        always = cache_free_sample(model, labels, 16, 4.0, -1, torch.Generator().manual_seed(2), **sampling)
        assert not torch.equal(ours.long(), always)


def test_generate_llamagen_arguments():
    model = small_gpt().eval()
    labels = torch.tensor([1, 2])
    greedy = generate(model, labels, cfg_scale=3.0, temperature=0.0)
    assert greedy.dtype == torch.int64
    assert torch.equal(generate(model, labels, 16, cfg_scale=3.0, sample_logits=False).long(), greedy)
    assert torch.equal(generate(model, labels, 16, None, 3.0, -1, 1.0, 0, 0.0).long(), greedy), "top_p=0: greedy"
    assert torch.equal(generate(model, labels, 5, cfg_scale=3.0, temperature=0.0).long(), greedy[:, :5])
    assert torch.equal(generate(model, labels, 16, emb_masks=torch.ones(2, 1), cfg_scale=3.0,
                                temperature=0.0).long(), greedy)
    with pytest.raises(ValueError, match="emb_masks"):
        generate(model, labels, 16, emb_masks=torch.zeros(2, 1), cfg_scale=3.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, labels, 17)
    with pytest.raises(ValueError, match="t2i"):
        generate(model, torch.randn(2, 120, 64), 16)


def test_llamagen_weights_in_our_gpt_give_llamagen_greedy_tokens():
    """The same weights in LlamaGen's structure (LlamaGen's loop) and in our GPT (our sampler, LlamaGen's call)
    give the same greedy tokens, guidance switched off by cfg_interval included."""
    from models.nets.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    args = LGArgs(block_size=64, vocab_size=512)
    original = LGTransformer(args).eval()
    ours = GPT(GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=512, num_classes=10, grid=(8, 8),
                         token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0))
    ours.load_state_dict(original.state_dict(), strict=True)
    labels = torch.tensor([2, 6])
    with torch.no_grad():
        want = lg_generate_greedy(original, labels, 64, cfg_scale=4.0, cfg_interval=10)
    got = generate(ours, labels, 64, cfg_scale=4.0, cfg_interval=10, sample_logits=False)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# LlamaGen checkpoints: every layout, written here, loaded through the one loader
# ---------------------------------------------------------------------------------------------------------


class NotAllowed:
    """A type no checkpoint of ours or LlamaGen's holds: the loader must refuse a file naming it."""


def _micro_llamagen():
    """A LlamaGen-structured model with the dims of our "micro" preset (dim 128, 4 layers, 2 heads), palette-sized
    vocab (8), 10 classes + null, 4x4 tokens (image 64 px at downsample 16)."""
    torch.manual_seed(0)
    return LGTransformer(LGArgs(dim=128, n_layer=4, n_head=2, vocab_size=8, num_classes=10, block_size=16))


def _layouts(state, args_ns):
    compiled = {"_orig_mod." + k: v for k, v in state.items()}
    return {
        "ddp_model": {"model": state, "optimizer": {}, "steps": 10, "args": args_ns},
        "deepspeed_module": {"module": state},
        "ema_only": {"ema": state, "args": args_ns},
        "state_dict": {"state_dict": state},
        "bare_fsdp_with_freqs": {**state, "freqs_cis": torch.randn(17, 32, 2)},
        "bare_compiled": compiled,
    }


def test_llamagen_checkpoint_layouts_load(tmp_path):
    import argparse

    from models.nets.gpt import load_llamagen_gpt

    original = _micro_llamagen().train()
    state = original.state_dict()
    args_ns = argparse.Namespace(gpt_model="micro", image_size=64, gpt_type="c2i", lr=1e-4)
    idx, labels = torch.randint(0, 8, (2, 15)), torch.tensor([1, 9])
    torch.manual_seed(5)
    want, _ = original(idx=idx, cond_idx=labels)
    for name, obj in _layouts(state, args_ns).items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        model = load_llamagen_gpt(str(path), gpt_model="micro", image_size=64, codebook_size=8)
        assert model.config.num_classes == 10 and model.config.grid == (4, 4) and not model.training
        assert model.rope_table.dtype == torch.float32
        model.train()
        for m in model.modules():  # the preset's LlamaGen dropouts (0.1) off, as in the original here
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        torch.manual_seed(5)  # same class-dropout draws
        got, _ = model(idx, labels)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=name)
    # the stored Namespace supplies --gpt-model / --image-size when they are not passed
    model = load_llamagen_gpt(str(tmp_path / "ddp_model.pt"), codebook_size=8)
    assert model.config.dim == 128 and model.config.grid == (4, 4)


def test_llamagen_checkpoints_refused_clearly(tmp_path):
    import argparse

    from models.checkpoint import CheckpointError, UnsafeCheckpointError
    from models.nets.gpt import llamagen_state_dict, load_llamagen_gpt

    state = _micro_llamagen().state_dict()
    kw = dict(gpt_model="micro", image_size=64, codebook_size=8)
    cases = {
        "t2i_args": ({"model": state, "args": argparse.Namespace(gpt_type="t2i")}, CheckpointError, "t2i"),
        "t2i_weights": ({"model": {**state, "cls_embedding.cap_proj.fc1.weight": torch.zeros(2, 2)}},
                        CheckpointError, "t2i"),
        "no_weights": ({"optimizer": {}, "steps": 3}, CheckpointError, "no LlamaGen GPT weights"),
        "other_type": ({"model": state, "args": NotAllowed()}, UnsafeCheckpointError, "NotAllowed"),
    }
    for name, (obj, error, match) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        with pytest.raises(error, match=match):
            load_llamagen_gpt(str(path), **kw)
    torch.save({"model": state}, tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match="does not match --gpt-model GPT-B"):
        load_llamagen_gpt(str(tmp_path / "ok.pt"), gpt_model="GPT-B", image_size=64, codebook_size=8)
    with pytest.raises(CheckpointError, match="--gpt-model"):
        load_llamagen_gpt(str(tmp_path / "ok.pt"), image_size=64, codebook_size=8)
    assert set(llamagen_state_dict({"model": state})) == set(state)


def test_sample_cli_runs_a_llamagen_checkpoint(tmp_path):
    """``python -m models.sample --gpt-ckpt ... --gpt-model ... --image-size ...`` as a LlamaGen user types it."""
    import argparse

    from models import sample

    torch.save({"model": _micro_llamagen().state_dict(), "args": argparse.Namespace(gpt_type="c2i")},
               tmp_path / "c2i_micro_64.pt")
    out = tmp_path / "grid.png"
    sample.main(["--gpt-ckpt", str(tmp_path / "c2i_micro_64.pt"), "--gpt-model", "micro", "--image-size", "64",
                 "--codebook-size", "8", "--n", "2", "--cfg", "2.0", "--top-k", "4", "--out", str(out),
                 "--device", "cpu"])
    assert out.is_file() and (tmp_path / "grid.pt").is_file()
    with pytest.raises(SystemExit):  # one model source, not both
        sample.parse_args(["--ckpt", "a.pt", "--gpt-ckpt", "b.pt"])
    from models import evaluate

    args = evaluate.parse_args(["--gpt-ckpt", "c2i_B_256.pt", "--gpt-model", "GPT-B", "--image-size", "256"])
    assert (args.gpt_ckpt, args.gpt_model, args.image_size, args.ckpt) == ("c2i_B_256.pt", "GPT-B", 256, None)


def test_rope_module_table_stays_fp32_under_casts():
    rope = mk.Rope2D((4, 4), 16)
    fresh = rope.table.clone()
    x = torch.randn(2, 17, 3, 16)
    for dtype in (torch.bfloat16, torch.float16):
        rope = rope.to(dtype)
        assert rope.table.dtype == torch.float32 and torch.equal(rope.table, fresh)
        assert rope(x.to(dtype)).dtype == dtype
