"""KV-cache decode attention in plain PyTorch: the specification the other backends are held to.

Semantics (every backend follows them exactly):

* ``q`` (B, S_q, H, D); caches (B, S_max, H_kv, D) BSHD; ``H % H_kv == 0`` (query head ``h`` reads kv head
  ``h // (H // H_kv)``, grouped-query attention as FlashAttention);
* ``cache_seqlens`` (B,) int: each sequence's cache length **before** this call's append; never modified;
* with ``k_new``/``v_new`` (B, S_q, H_kv, D) the new rows are written in place at ``cache_seqlens[b] + i``
  (i < S_q), and the key length becomes ``L_b = cache_seqlens[b] + S_q``; without them ``L_b = cache_seqlens[b]``
  (the queries are the last S_q tokens already in the cache);
* bottom-right causal alignment: query ``i`` sits at absolute position ``p_i = L_b - S_q + i`` and attends to every
  key ``j <= p_i``;
* with ``rope_table`` (rows from :func:`mirai_kernels.rope_2d_table`), q and k_new are rotated by table row ``p_i``
  (LlamaGen interleaved-pair convention, :func:`mirai_kernels.reference.rope.apply_rope_2d`, result rounded to the
  input dtype as LlamaGen does) before k_new is written and before attention; v is never rotated;
* non-finite inputs follow :mod:`mirai_kernels.reference.attention`: masked-out cache rows (past ``L_b``, or after
  the query's position) never reach a row, NaN in q or a visible key/value propagates as in SDPA, and a row with
  nothing to attend (no key: only with bad ``cache_seqlens``; or all visible scores ``-inf``) outputs zeros.
"""

from __future__ import annotations

import math

import torch

from .attention import masked_attention
from .rope import apply_rope_2d


def query_positions(cache_seqlens: torch.Tensor, seqlen_q: int, appending: bool) -> torch.Tensor:
    """Absolute position of each query, (B, S_q) int64: ``L_b - S_q + i`` (``L_b`` the length after the append)."""
    lengths = cache_seqlens.long() + (seqlen_q if appending else 0)
    return lengths[:, None] - seqlen_q + torch.arange(seqlen_q, device=cache_seqlens.device)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    rope_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append (in place), rotate and attend; returns (B, S_q, H, D) in ``q``'s dtype. Computes in the inputs'
    precision, at least fp32. Assumes valid inputs (the public function checks them)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_kv = k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    appending = k_new is not None
    pos = query_positions(cache_seqlens, seqlen_q, appending)  # (B, S_q)

    if rope_table is not None:
        q = apply_rope_2d(q, rope_table, pos)
        if appending:
            k_new = apply_rope_2d(k_new, rope_table, pos)
    if appending:
        rows = pos[:, :, None, None].expand(batch, seqlen_q, nheads_kv, head_dim)
        k_cache.scatter_(1, rows, k_new.to(k_cache.dtype))
        v_cache.scatter_(1, rows, v_new.to(v_cache.dtype))

    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    group = nheads // nheads_kv
    # The op has no autocast rule: it computes as specified above whatever autocast region it is called in.
    with torch.autocast(q.device.type, enabled=False):
        k = k_cache.to(compute_dtype).repeat_interleave(group, dim=2)
        v = v_cache.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)  # (B, H, S_max, D)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute_dtype), k) * scale
        keys = torch.arange(k_cache.shape[1], device=q.device)
        visible = keys[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, S_q, S_max)
        out, _ = masked_attention(scores, visible, v)  # (B, H, S_q, D)
    return out.transpose(1, 2).contiguous().to(q.dtype)
