"""Triton backend of KV-cache decode attention (flash-decoding): prep, split-KV attention, combine.

Three launches per call, all with static grids (shapes only, never ``cache_seqlens`` values), so a step is
CUDA-graph capturable:

1. ``_decode_prep_kernel`` (only with an append or a rope table), one program per new token: rotates q into a
   scratch buffer and k_new into its cache row, copies v_new. Rotated values are rounded to the input dtype, as the
   reference (and LlamaGen) do.
2. ``_decode_split_kernel``, one program per (batch, kv head, split[, query tile]): every query of the kv head's
   group (GQA) times every new token forms the rows of one ``tl.dot`` tile, so each key block is loaded once per
   group. The split's key range is computed on the device from ``cache_seqlens``, so short sequences in a batch
   spread their few keys over all splits instead of leaving most programs idle. It writes an fp32 partial output
   and a base-2 log-sum-exp per row and split.
3. ``_decode_combine_kernel``, one program per (batch, token, head): merges the splits by their log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ._compat import loop_bound
from ._softmax import LOG2E as _LOG2E


@triton.jit
def _decode_prep_kernel(
    q_ptr,
    q_out_ptr,
    k_new_ptr,
    v_new_ptr,
    k_cache_ptr,
    v_cache_ptr,
    seqlens_ptr,
    table_ptr,
    seqlen_q,
    max_seqlen,
    table_rows,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_knb,
    stride_kns,
    stride_knh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    NHEADS: tl.constexpr,
    NHEADS_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    APPEND: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    b = token // seqlen_q
    i = token % seqlen_q
    cache_len = tl.load(seqlens_ptr + b)
    if APPEND:
        pos = cache_len + i
    else:
        pos = cache_len - seqlen_q + i
    # Out-of-range positions come only from invalid seqlens (checked on CPU / under MIRAI_DEBUG); even then, never
    # touch memory outside the cache or the table.
    in_cache = (pos >= 0) & (pos < max_seqlen)
    pos = tl.minimum(tl.maximum(pos, 0), max_seqlen - 1)
    b64 = b.to(tl.int64)
    pos64 = pos.to(tl.int64)

    heads = tl.arange(0, BLOCK_H)
    pair = tl.arange(0, BLOCK_P)
    pair_ok = pair < HEAD_DIM // 2
    if ROPE:
        rot = table_ptr + tl.minimum(pos64, table_rows - 1) * HEAD_DIM + pair * 2
        cos = tl.load(rot, mask=pair_ok, other=0.0)[None, :]
        sin = tl.load(rot + 1, mask=pair_ok, other=0.0)[None, :]

        q_mask = (heads < NHEADS)[:, None] & pair_ok[None, :]
        q_src = q_ptr + b64 * stride_qb + i * stride_qs + heads[:, None] * stride_qh + pair[None, :] * 2
        q0 = tl.load(q_src, mask=q_mask, other=0.0).to(tl.float32)
        q1 = tl.load(q_src + 1, mask=q_mask, other=0.0).to(tl.float32)
        q_dst = q_out_ptr + b64 * stride_ob + i * stride_os + heads[:, None] * stride_oh + pair[None, :] * 2
        tl.store(q_dst, (q0 * cos - q1 * sin).to(q_out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(q_dst + 1, (q1 * cos + q0 * sin).to(q_out_ptr.dtype.element_ty), mask=q_mask)

    if APPEND:
        kv_ok = (heads < NHEADS_KV) & in_cache
        k_mask = kv_ok[:, None] & pair_ok[None, :]
        k_src = k_new_ptr + b64 * stride_knb + i * stride_kns + heads[:, None] * stride_knh + pair[None, :] * 2
        k_dst = k_cache_ptr + b64 * stride_kb + pos64 * stride_ks + heads[:, None] * stride_kh + pair[None, :] * 2
        k0 = tl.load(k_src, mask=k_mask, other=0.0)
        k1 = tl.load(k_src + 1, mask=k_mask, other=0.0)
        if ROPE:
            k0f = k0.to(tl.float32)
            k1f = k1.to(tl.float32)
            k0 = (k0f * cos - k1f * sin).to(k_cache_ptr.dtype.element_ty)
            k1 = (k1f * cos + k0f * sin).to(k_cache_ptr.dtype.element_ty)
        tl.store(k_dst, k0, mask=k_mask)
        tl.store(k_dst + 1, k1, mask=k_mask)

        d = tl.arange(0, BLOCK_D)
        v_mask = kv_ok[:, None] & (d < HEAD_DIM)[None, :]
        v_src = v_new_ptr + b64 * stride_vnb + i * stride_vns + heads[:, None] * stride_vnh + d[None, :]
        v_dst = v_cache_ptr + b64 * stride_vb + pos64 * stride_vs + heads[:, None] * stride_vh + d[None, :]
        tl.store(v_dst, tl.load(v_src, mask=v_mask, other=0.0), mask=v_mask)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    seqlens_ptr,
    part_o_ptr,
    part_lse_ptr,
    scale_log2,
    seqlen_q,
    max_seqlen,
    num_splits,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    NHEADS: tl.constexpr,
    NHEADS_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    APPEND: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    GROUP: tl.constexpr = NHEADS // NHEADS_KV
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // NHEADS_KV
    hk = bh % NHEADS_KV
    b64 = b.to(tl.int64)

    # Rows of this tile: r = i * GROUP + g is query token i of head hk * GROUP + g.
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < seqlen_q * GROUP
    i = r // GROUP
    head = hk * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    length = tl.load(seqlens_ptr + b)
    if APPEND:
        length += seqlen_q
    length = tl.minimum(length, max_seqlen)  # only invalid seqlens exceed it; never read past the cache
    last_key = length - seqlen_q + i  # bottom-right causal: row i sees keys <= last_key

    # Key range of this split: equal shares of this sequence's keys, in whole blocks.
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    q_ptrs = q_ptr + b64 * stride_qb + i[:, None] * stride_qs + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_cache_ptr + b64 * stride_kb + hk * stride_kh
    v_base = v_cache_ptr + b64 * stride_vb + hk * stride_vh
    for key0 in range(loop_bound(start), loop_bound(end), BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = key_ok[None, :] & (keys[None, :] <= last_key[:, None])
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys.to(tl.int64)[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has_keys = l_i > 0.0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    # Partials are laid out (B, S_q, H, num_splits[, D]) so the combine reads one contiguous block per row.
    row = (b64 * seqlen_q + i) * NHEADS + head
    tl.store(part_lse_ptr + row * num_splits + split, lse, mask=row_ok)
    o_ptrs = part_o_ptr + (row * num_splits + split)[:, None] * HEAD_DIM + d[None, :]
    tl.store(o_ptrs, o, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * S_q + i) * H + h; out is contiguous (B, S_q, H, D)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # 0 for empty splits
    mask = s_ok[:, None] & (d < HEAD_DIM)[None, :]
    o = tl.load(part_o_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------------------
# Configuration and launch
# ---------------------------------------------------------------------------------------------------------

_MAX_SPLITS = 64


def _block_m(rows: int) -> int:
    # tl.dot needs M >= 16; more than 64 query rows per tile would spill the fp32 accumulator at hd 128.
    return min(64, max(16, triton.next_power_of_2(rows)))


def _block_n(head_dim: int) -> int:
    if triton_interpreted():
        return 32  # the interpreter's cost is per block iteration; small blocks keep masked waste low
    return 64 if head_dim <= 64 else 32


def num_splits_heuristic(batch: int, nheads_kv: int, max_seqlen: int, device: torch.device) -> int:
    """Splits per (batch, kv head) when the caller passes ``num_splits=0``. Static shapes only (not the
    ``cache_seqlens`` values), so a CUDA-graph-captured step keeps its grid: about eight programs per SM (latency
    hiding for a bandwidth-bound loop), each split keeping >= 128 keys of a full cache."""
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # interpreter: a few splits, to exercise the combine without many serial programs
    by_occupancy = triton.cdiv(target, max(batch * nheads_kv, 1))
    by_length = max(1, max_seqlen // 128)
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    rope_table: torch.Tensor | None,
    softmax_scale: float,
    num_splits: int,
) -> torch.Tensor:
    """Launch prep (if needed), split-KV attention and combine. Inputs are checked by the door (unit last-dim
    strides, shapes, dtypes). Mutates the caches when ``k_new``/``v_new`` are given. Returns a contiguous
    (B, S_q, H, D) tensor of ``q``'s dtype."""
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_kv = k_cache.shape[2]
    out = torch.empty((batch, seqlen_q, nheads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    append = k_new is not None
    rope = rope_table is not None
    cache_seqlens = cache_seqlens.contiguous()  # the kernels index it by batch
    if num_splits <= 0:
        num_splits = num_splits_heuristic(batch, nheads_kv, k_cache.shape[1], q.device)
    num_splits = min(num_splits, _MAX_SPLITS)

    q_attn = q
    if append or rope:
        q_attn = torch.empty_like(out) if rope else q
        k_arg = k_new if append else q  # any pointer of the right dtype: never read
        v_arg = v_new if append else q
        _decode_prep_kernel[(batch * seqlen_q,)](
            q,
            q_attn,
            k_arg,
            v_arg,
            k_cache,
            v_cache,
            cache_seqlens,
            rope_table if rope else cache_seqlens,
            seqlen_q,
            k_cache.shape[1],
            rope_table.shape[0] if rope else 1,
            *q.stride()[:3],
            *q_attn.stride()[:3],
            *k_arg.stride()[:3],
            *v_arg.stride()[:3],
            *k_cache.stride()[:3],
            *v_cache.stride()[:3],
            NHEADS=nheads,
            NHEADS_KV=nheads_kv,
            HEAD_DIM=head_dim,
            APPEND=append,
            ROPE=rope,
            BLOCK_H=triton.next_power_of_2(max(nheads, nheads_kv)),
            BLOCK_P=triton.next_power_of_2(max(head_dim // 2, 1)),
            BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=4,
        )

    rows = seqlen_q * (nheads // nheads_kv)
    block_m = _block_m(rows)
    block_d = max(16, triton.next_power_of_2(head_dim))
    part_o = torch.empty((batch, seqlen_q, nheads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, seqlen_q, nheads, num_splits), dtype=torch.float32, device=q.device)
    grid = (batch * nheads_kv, num_splits, triton.cdiv(rows, block_m))
    _decode_split_kernel[grid](
        q_attn,
        k_cache,
        v_cache,
        cache_seqlens,
        part_o,
        part_lse,
        softmax_scale * _LOG2E,
        seqlen_q,
        k_cache.shape[1],
        num_splits,
        *q_attn.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        NHEADS=nheads,
        NHEADS_KV=nheads_kv,
        HEAD_DIM=head_dim,
        APPEND=append,
        IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=_block_n(head_dim),
        BLOCK_D=block_d,
        num_warps=4,
        num_stages=2,
    )
    _decode_combine_kernel[(batch * seqlen_q * nheads,)](
        part_o,
        part_lse,
        out,
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
    return out


def aot_specs() -> list[dict]:
    """Every kernel configuration this module launches on a GPU, for the sm_90 ahead-of-time compile check
    (``python -m mirai_kernels.triton.aot_check``); format of :func:`mirai_kernels.triton.rope.aot_specs`. Covered:
    fp16/bf16/fp32, head dims 64 and 128, 12 heads (GPT-B; MHA) and 16:2 (GQA), S_q 1 and 4."""
    specs = []
    i32 = "i32"
    for dtype in ("fp16", "bf16", "fp32"):
        for head_dim in (64, 128):
            for append, rope in ((True, True), (True, False), (False, True)):
                for nheads, nheads_kv in ((12, 12), (16, 2)) if dtype == "fp16" else ((12, 12),):
                    signature = {
                        "q_ptr": f"*{dtype}", "q_out_ptr": f"*{dtype}", "k_new_ptr": f"*{dtype}",
                        "v_new_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
                        "seqlens_ptr": "*i32", "table_ptr": "*fp32" if rope else "*i32",
                    }
                    signature.update({name: i32 for name in _decode_prep_kernel.arg_names
                                      if name not in signature and not name.isupper()})
                    specs.append({
                        "name": f"decode_prep[{dtype},hd{head_dim},h{nheads}/{nheads_kv},append={append},rope={rope}]",
                        "fn": _decode_prep_kernel,
                        "signature": signature,
                        "constexprs": {
                            "NHEADS": nheads, "NHEADS_KV": nheads_kv, "HEAD_DIM": head_dim, "APPEND": append,
                            "ROPE": rope, "BLOCK_H": triton.next_power_of_2(nheads),
                            "BLOCK_P": triton.next_power_of_2(head_dim // 2),
                            "BLOCK_D": triton.next_power_of_2(head_dim),
                        },
                        "num_warps": 4,
                        "num_stages": 3,
                    })
            for (nheads, nheads_kv, seqlen_q) in ((12, 12, 1), (16, 2, 1), (16, 2, 4), (12, 12, 8)):
                for append in (True, False) if seqlen_q == 1 and nheads == 12 else (True,):
                    signature = {
                        "q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
                        "seqlens_ptr": "*i32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "scale_log2": "fp32",
                    }
                    signature.update({name: i32 for name in _decode_split_kernel.arg_names
                                      if name not in signature and not name.isupper()})
                    block_m = _block_m(seqlen_q * (nheads // nheads_kv))
                    specs.append({
                        "name": f"decode_split[{dtype},hd{head_dim},h{nheads}/{nheads_kv},sq{seqlen_q},append={append}]",
                        "fn": _decode_split_kernel,
                        "signature": signature,
                        "constexprs": {
                            "NHEADS": nheads, "NHEADS_KV": nheads_kv, "HEAD_DIM": head_dim, "APPEND": append,
                            "IEEE": dtype == "fp32", "BLOCK_M": block_m, "BLOCK_N": 64 if head_dim <= 64 else 32,
                            "BLOCK_D": head_dim,
                        },
                        "num_warps": 4,
                        "num_stages": 2,
                    })
            for block_s in (1, 4, 16, 64):
                specs.append({
                    "name": f"decode_combine[{dtype},hd{head_dim},splits<={block_s}]",
                    "fn": _decode_combine_kernel,
                    "signature": {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}",
                                  "num_splits": i32},
                    "constexprs": {"HEAD_DIM": head_dim, "BLOCK_S": block_s,
                                   "BLOCK_D": triton.next_power_of_2(head_dim)},
                    "num_warps": 4,
                    "num_stages": 3,
                })
    return specs
