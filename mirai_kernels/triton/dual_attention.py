"""Triton backend of dual (causal + bidirectional) attention: forward, and a backward of a row-wise preprocess kernel
and a dK/dV kernel that also accumulates dQ atomically (a separate dQ kernel under deterministic algorithms).

Forward: one program per (query block, batch x head). Keys split into three regions for the block
``[m0, m0 + BLOCK_M)``: ``[0, m0)`` feeds only the causal accumulator, the diagonal blocks ``[m0, m0 + BLOCK_M)``
feed both (split per element by ``j <= i``), ``[m0 + BLOCK_M, S)`` only the second ("U") accumulator. The
bidirectional row is the log-sum-exp merge of the two (docs/method.md, "The shared bidirectional pass"). Ragged
tails (any S) are masked, so S need not be a multiple of a block.

Backward: each query row carries one (lse, dO, D) triple for its causal keys and one for its future keys; the
preprocess kernel builds them (``alpha = exp(lse_c - lse_b)``: ``dO_c + alpha dO_b`` and ``D_c + alpha D_b`` for
causal keys, ``dO_b``, ``D_b`` and ``lse_b`` for future ones), so the kernels see plain attention backward over two
regions.
dK/dV programs own a key block of one K/V head and loop over the grouped query heads (dK/dV need no atomics); dQ is
added atomically into an fp32 buffer, or, under ``torch.use_deterministic_algorithms``, computed by dQ programs that
own a query block. Scores are kept in base 2 (``exp2``), with the scale folded in.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ._compat import loop_bound
from ._softmax import LN2_, LOG2E, LOG2E_
from ._softmax import softmax_update as _softmax_update

# LOG2E: scores are kept in base 2 (exp2), the softmax scale times LOG2E folded in; LN2 turns back (LSEs, dQ, dK).
_LOG2E, _LN2 = LOG2E_, LN2_


# ---------------------------------------------------------------------------------------------------------
# Shared pieces of the backward kernels (the forward's online softmax is _softmax.softmax_update)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_tile_kq(st, v, do, lse, delta, visible, dv, PREC: tl.constexpr):
    """One (keys, queries) tile of the attention backward, from the base-2 scores ``st = K Q^T``: the
    probabilities ``P^T = exp2(st - lse)`` where ``visible`` (0 elsewhere), ``dS^T = P^T (V dO^T - delta)``
    returned, and ``dV += P^T dO``."""
    pt = tl.math.exp2(tl.where(visible, st - lse[None, :], float("-inf")))
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)  # after dS, as the kernels always ordered it
    return dst, dv


@triton.jit
def _bwd_tile_qk(s, v, do, lse, delta, visible, PREC: tl.constexpr):
    """The same tile the other way round, from ``s = Q K^T``: ``dS = P (dO V^T - delta)``."""
    p = tl.math.exp2(tl.where(visible, s - lse[:, None], float("-inf")))
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p * (dp - delta[:, None])


@triton.jit
def _atomic_add_dq(dq_acc_ptr, dst, k, grad_scale, row0, offs_m, nheads, h, offs_d, mask, HEAD_DIM: tl.constexpr,
                   PREC: tl.constexpr):
    """Add this key block's share ``dS K * grad_scale`` of dQ into the fp32 (B, S, H, D) buffer (``row0`` =
    b * seqlen, int64)."""
    dq_part = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PREC) * grad_scale
    dq_rows = ((row0 + offs_m) * nheads + h) * HEAD_DIM
    tl.atomic_add(dq_acc_ptr + dq_rows[:, None] + offs_d[None, :], dq_part, mask=mask)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, oc_ptr, ob_ptr, lsec_ptr, lseb_ptr,
    seqlen, nheads, group, qk_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, BIDIR: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // group
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_c = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_c = tl.zeros([BLOCK_M], tl.float32)
    acc_c = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_u = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_u = tl.zeros([BLOCK_M], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Region C: keys [0, m0), visible to every row (BLOCK_N divides BLOCK_M, so no chunk straddles m0).
    for n0 in range(0, loop_bound(m0), BLOCK_N):
        cols = n0 + offs_n
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        m_c, l_c, acc_c = _softmax_update(m_c, l_c, acc_c, s, v, False, PREC)

    # Diagonal: keys [m0, m0 + BLOCK_M), split by j <= i.
    for n0 in range(loop_bound(m0), loop_bound(m0 + BLOCK_M), BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < seqlen
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        past = (cols[None, :] <= offs_m[:, None]) & n_ok[None, :]
        # Empty rows: padding rows have no causal key yet, and a row may have no future key in this block.
        m_c, l_c, acc_c = _softmax_update(m_c, l_c, acc_c, tl.where(past, s, float("-inf")), v, True, PREC)
        if BIDIR:
            s_u = tl.where((cols[None, :] > offs_m[:, None]) & n_ok[None, :], s, float("-inf"))
            m_u, l_u, acc_u = _softmax_update(m_u, l_u, acc_u, s_u, v, True, PREC)

    # Region U: keys [m0 + BLOCK_M, S), in every row's future.
    if BIDIR:
        for n0 in range(loop_bound(m0 + BLOCK_M), loop_bound(seqlen), BLOCK_N):
            cols = n0 + offs_n
            n_ok = cols < seqlen
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            m_u, l_u, acc_u = _softmax_update(m_u, l_u, acc_u, tl.where(n_ok[None, :], s, float("-inf")), v, False,
                                              PREC)

    l_c = tl.where(m_ok, l_c, 1.0)
    o_base = b.to(tl.int64) * stride_ob + h * stride_oh
    o_offs = offs_m[:, None] * stride_os + offs_d[None, :]
    o_mask = m_ok[:, None] & d_ok[None, :]
    lse_offs = bh.to(tl.int64) * seqlen + offs_m
    if CAUSAL:
        tl.store(oc_ptr + o_base + o_offs, (acc_c / l_c[:, None]).to(oc_ptr.dtype.element_ty), mask=o_mask)
        tl.store(lsec_ptr + lse_offs, (m_c + tl.math.log2(l_c)) * _LN2, mask=m_ok)
    if BIDIR:
        mx = tl.maximum(m_c, m_u)
        w_c = tl.math.exp2(m_c - mx)
        w_u = tl.math.exp2(m_u - mx)  # 0 where a row has no future key (m_u = -inf)
        denom = l_c * w_c + l_u * w_u
        out = (acc_c * w_c[:, None] + acc_u * w_u[:, None]) / denom[:, None]
        tl.store(ob_ptr + o_base + o_offs, out.to(ob_ptr.dtype.element_ty), mask=o_mask)
        tl.store(lseb_ptr + lse_offs, (mx + tl.math.log2(denom)) * _LN2, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, doc_ptr, dou_ptr, lsec_ptr, lseu_ptr, dc_ptr, du_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
    seqlen, nheads, nheads_k, group, qk_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    stride_ub, stride_us, stride_uh,
    stride_dkb, stride_dks, stride_dkh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HAS_U: tl.constexpr, PREC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    # One key block of one K/V head; query blocks have the same size, so the diagonal is one block. With ATOMIC_DQ
    # each query block's dQ share (dS K, already scaled) is added into the fp32 (B, S, H, D) buffer dq_acc: the
    # backward then costs 5 block products per tile instead of 7 (no dQ kernel recomputing S and dP), at the price
    # of a run-to-run order of fp32 additions.
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // nheads_k
    hk = bhk % nheads_k
    n0 = pid_n * BLOCK
    offs_n = n0 + tl.arange(0, BLOCK)
    offs_m0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < seqlen
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for h in range(loop_bound(hk * group), loop_bound(hk * group + group)):
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
        doc_base = doc_ptr + b.to(tl.int64) * stride_gb + h * stride_gh
        dou_base = dou_ptr + b.to(tl.int64) * stride_ub + h * stride_uh
        row_base = (b * nheads + h).to(tl.int64) * seqlen
        # Query blocks at or after the key block: causal keys for them (the diagonal block mixes C and U).
        for m0 in range(loop_bound(n0), loop_bound(seqlen), BLOCK):
            offs_m = m0 + offs_m0
            m_ok = offs_m < seqlen
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
            do_c = tl.load(doc_base + offs_m[:, None] * stride_gs + offs_d[None, :], mask=q_mask, other=0.0)
            lse_c = tl.load(lsec_ptr + row_base + offs_m, mask=m_ok, other=0.0)
            d_c = tl.load(dc_ptr + row_base + offs_m, mask=m_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (keys, queries)
            past = (offs_n[:, None] <= offs_m[None, :]) & m_ok[None, :] & n_ok[:, None]
            dst, dv = _bwd_tile_kq(st, v, do_c, lse_c, d_c, past, dv, PREC)
            if HAS_U:
                if m0 == n0:
                    do_u = tl.load(dou_base + offs_m[:, None] * stride_us + offs_d[None, :], mask=q_mask, other=0.0)
                    lse_u = tl.load(lseu_ptr + row_base + offs_m, mask=m_ok, other=0.0)
                    d_u = tl.load(du_ptr + row_base + offs_m, mask=m_ok, other=0.0)
                    future = (offs_n[:, None] > offs_m[None, :]) & m_ok[None, :] & n_ok[:, None]
                    dst_u, dv = _bwd_tile_kq(st, v, do_u, lse_u, d_u, future, dv, PREC)
                    dst += dst_u
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
            if ATOMIC_DQ:
                _atomic_add_dq(dq_acc_ptr, dst, k, qk_scale * _LN2, b.to(tl.int64) * seqlen, offs_m, nheads, h,
                               offs_d, q_mask, HEAD_DIM, PREC)
        if HAS_U:
            # Query blocks before the key block: these keys are in their future.
            for m0 in range(0, loop_bound(n0), BLOCK):
                offs_m = m0 + offs_m0
                q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                do_u = tl.load(dou_base + offs_m[:, None] * stride_us + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                lse_u = tl.load(lseu_ptr + row_base + offs_m)
                d_u = tl.load(du_ptr + row_base + offs_m)
                st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
                dst, dv = _bwd_tile_kq(st, v, do_u, lse_u, d_u, n_ok[:, None], dv, PREC)
                dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
                if ATOMIC_DQ:
                    _atomic_add_dq(dq_acc_ptr, dst, k, qk_scale * _LN2, b.to(tl.int64) * seqlen, offs_m, nheads, h,
                                   offs_d, d_ok[None, :], HEAD_DIM, PREC)
    # dS above is w.r.t. base-2 scores scaled by qk_scale = scale * log2(e); d(score)/dk = scale * q.
    dk = dk * (qk_scale * _LN2)
    out_offs = b.to(tl.int64) * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    tl.store(dk_ptr + out_offs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, doc_ptr, dou_ptr, lsec_ptr, lseu_ptr, dc_ptr, du_ptr, dq_ptr,
    seqlen, nheads, group, qk_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    stride_ub, stride_us, stride_uh,
    stride_dqb, stride_dqs, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HAS_U: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // group
    m0 = pid_m * BLOCK
    offs_m = m0 + tl.arange(0, BLOCK)
    offs_n0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=q_mask, other=0.0)
    g_offs = b.to(tl.int64) * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :]
    do_c = tl.load(doc_ptr + g_offs, mask=q_mask, other=0.0)
    row = bh.to(tl.int64) * seqlen + offs_m
    lse_c = tl.load(lsec_ptr + row, mask=m_ok, other=0.0)
    d_c = tl.load(dc_ptr + row, mask=m_ok, other=0.0)
    if HAS_U:
        u_offs = b.to(tl.int64) * stride_ub + h * stride_uh + offs_m[:, None] * stride_us + offs_d[None, :]
        do_u = tl.load(dou_ptr + u_offs, mask=q_mask, other=0.0)
        lse_u = tl.load(lseu_ptr + row, mask=m_ok, other=0.0)
        d_u = tl.load(du_ptr + row, mask=m_ok, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    # Keys up to and including the diagonal block.
    for n0 in range(0, loop_bound(m0 + BLOCK), BLOCK):
        cols = n0 + offs_n0
        n_ok = cols < seqlen
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        past = (cols[None, :] <= offs_m[:, None]) & n_ok[None, :] & m_ok[:, None]
        ds = _bwd_tile_qk(s, v, do_c, lse_c, d_c, past, PREC)
        if HAS_U:
            if n0 == m0:
                future = (cols[None, :] > offs_m[:, None]) & n_ok[None, :] & m_ok[:, None]
                ds += _bwd_tile_qk(s, v, do_u, lse_u, d_u, future, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    if HAS_U:
        for n0 in range(loop_bound(m0 + BLOCK), loop_bound(seqlen), BLOCK):
            cols = n0 + offs_n0
            n_ok = cols < seqlen
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            ds = _bwd_tile_qk(s, v, do_u, lse_u, d_u, n_ok[None, :] & m_ok[:, None], PREC)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * (qk_scale * _LN2)
    tl.store(dq_ptr + b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_preprocess_kernel(
    doc_ptr, oc_ptr, dob_ptr, ob_ptr, lsec_ptr, lseb_ptr, doeff_ptr, dc_ptr, du_ptr, lsec2_ptr, lseu2_ptr,
    seqlen, nheads, n_rows,
    stride_gcb, stride_gcs, stride_gch, stride_ocb, stride_ocs, stride_och,
    stride_gbb, stride_gbs, stride_gbh, stride_obb, stride_obs, stride_obh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_C: tl.constexpr,
    HAS_B: tl.constexpr,
):
    # Per query row: D = rowsum(dO * O) of each output, the causal keys' combined dO_c + alpha dO_b (written in
    # the inputs' dtype, with D shifted by that rounding so sum_j P_ij (dP_ij - D_i) stays 0), and base-2 LSEs.
    # Rows are (b, h, s) in the LSE layout.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < n_rows
    s_idx = rows % seqlen
    bh = rows // seqlen
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    offs_d = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    if HAS_C:
        do_c = tl.load(doc_ptr + (b * stride_gcb + s_idx * stride_gcs + h * stride_gch)[:, None] + offs_d[None, :],
                       mask=mask, other=0.0).to(tl.float32)
        o_c = tl.load(oc_ptr + (b * stride_ocb + s_idx * stride_ocs + h * stride_och)[:, None] + offs_d[None, :],
                      mask=mask, other=0.0).to(tl.float32)
        lse_c = tl.load(lsec_ptr + rows, mask=r_ok, other=0.0)
        d_c = tl.sum(do_c * o_c, 1)
    if HAS_B:
        do_b = tl.load(dob_ptr + (b * stride_gbb + s_idx * stride_gbs + h * stride_gbh)[:, None] + offs_d[None, :],
                       mask=mask, other=0.0).to(tl.float32)
        o_b = tl.load(ob_ptr + (b * stride_obb + s_idx * stride_obs + h * stride_obh)[:, None] + offs_d[None, :],
                      mask=mask, other=0.0).to(tl.float32)
        lse_b = tl.load(lseb_ptr + rows, mask=r_ok, other=0.0)
        d_b = tl.sum(do_b * o_b, 1)
        tl.store(du_ptr + rows, d_b, mask=r_ok)
        tl.store(lseu2_ptr + rows, lse_b * _LOG2E, mask=r_ok)
    if HAS_C and HAS_B:
        alpha = tl.exp(lse_c - lse_b)
        exact = do_c + alpha[:, None] * do_b
        rounded = exact.to(doeff_ptr.dtype.element_ty)
        eff_rows = ((b * seqlen + s_idx) * nheads + h) * HEAD_DIM  # contiguous (B, S, H, D)
        tl.store(doeff_ptr + eff_rows[:, None] + offs_d[None, :], rounded, mask=mask)
        d_c = d_c + alpha * d_b + tl.sum((rounded.to(tl.float32) - exact) * o_c, 1)
    if HAS_C:
        tl.store(dc_ptr + rows, d_c, mask=r_ok)
        tl.store(lsec2_ptr + rows, lse_c * _LOG2E, mask=r_ok)
    else:
        tl.store(dc_ptr + rows, d_b, mask=r_ok)
        tl.store(lsec2_ptr + rows, lse_b * _LOG2E, mask=r_ok)


# ---------------------------------------------------------------------------------------------------------
# Configurations and launchers
# ---------------------------------------------------------------------------------------------------------

# GPU (fwd): (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_N divides BLOCK_M. Two fp32 accumulators of
# BLOCK_M x head_dim live in registers, so head_dim 128 keeps BLOCK_M at 64. The autotune list is pruned to two
# configs per head dim (every one AOT-compiled for sm_90 in CI), so a cold run compiles at most two per variant;
# the first is the default that MIRAI_AUTOTUNE=0 launches alone.
_FWD_CONFIGS = {64: [(128, 64, 8, 3), (64, 64, 4, 3)], 128: [(64, 64, 4, 3), (64, 32, 4, 3)]}
# GPU (bwd): (BLOCK, num_warps, num_stages), fixed per head dim.
_BWD_CONFIG = {64: (64, 4, 2), 128: (64, 8, 2)}
# fp32 on a GPU (exact "ieee" products, not a training dtype): one small config, which keeps shared memory under
# the H100's limit at head dim 128 and the compile short.
_FP32_FWD_CONFIG = (32, 32, 4, 2)
_FP32_BWD_CONFIG = (32, 4, 2)
_INTERP_BLOCK = 32  # the interpreter runs programs serially: few, mid-sized blocks are fastest there


def _head_dim_key(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs keep fp32 products; ignored for fp16/bf16


_autotuned_fwd = None


def _autotune_enabled() -> bool:
    """``MIRAI_AUTOTUNE=0`` launches the first config of :data:`_FWD_CONFIGS` instead of autotuning over the
    (already pruned, all AOT-checked) list: one compile per kernel variant, for runs whose time is compile-bound."""
    return os.environ.get("MIRAI_AUTOTUNE", "1") != "0"


def _fwd_launcher():
    """The forward kernel, autotuned over :data:`_FWD_CONFIGS` on a GPU (the configs of both head-dim classes,
    pruned to the call's); a plain kernel with one fixed config in the interpreter."""
    global _autotuned_fwd
    if _autotuned_fwd is None:
        configs = sorted({c for cs in _FWD_CONFIGS.values() for c in cs})

        def prune(configs_, named_args, **kwargs):
            allowed = set(_FWD_CONFIGS[_head_dim_key(named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 64)))])
            kept = [c for c in configs_ if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    in allowed]
            return kept or configs_

        _autotuned_fwd = triton.autotune(
            configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs],
            key=["seqlen", "HEAD_DIM", "CAUSAL", "BIDIR"],
            prune_configs_by={"early_config_prune": prune},
        )(_fwd_kernel)
    return _autotuned_fwd


def dual_attention_fwd(q, k, v, softmax_scale: float, causal: bool, bidirectional: bool):
    """``q`` (B, S, H, D), ``k``/``v`` (B, S, Hk, D), unit last-dim stride. Returns ``(out_c, out_b, lse_c, lse_b)``,
    outputs contiguous in q's dtype, LSEs (B, H, S) fp32; an output not requested is an empty tensor."""
    batch, seqlen, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    empty = q.new_empty(0)
    out_c = torch.empty_like(q, memory_format=torch.contiguous_format) if causal else empty
    out_b = torch.empty_like(q, memory_format=torch.contiguous_format) if bidirectional else empty
    lse_c = q.new_empty((batch, nheads, seqlen), dtype=torch.float32) if causal else q.new_empty(0, dtype=torch.float32)
    lse_b = (q.new_empty((batch, nheads, seqlen), dtype=torch.float32) if bidirectional
             else q.new_empty(0, dtype=torch.float32))
    if q.numel() == 0 or not (causal or bidirectional):
        return out_c, out_b, lse_c, lse_b
    out_any = out_c if causal else out_b
    args = (
        q, k, v, out_c if causal else out_any, out_b if bidirectional else out_any,
        lse_c if causal else lse_b, lse_b if bidirectional else lse_c,
        seqlen, nheads, nheads // nheads_k, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out_any.stride(0), out_any.stride(1), out_any.stride(2),
    )
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), CAUSAL=causal, BIDIR=bidirectional,
                PREC=_prec(q.dtype))
    if triton_interpreted() or q.dtype == torch.float32 or not _autotune_enabled():
        if triton_interpreted():
            block_m, block_n, warps, stages = _INTERP_BLOCK, _INTERP_BLOCK, 4, 1
        elif q.dtype == torch.float32:
            block_m, block_n, warps, stages = _FP32_FWD_CONFIG
        else:  # MIRAI_AUTOTUNE=0: the first (default) config of the head-dim class, one compile per variant
            block_m, block_n, warps, stages = _FWD_CONFIGS[_head_dim_key(head_dim)][0]
        grid = (triton.cdiv(seqlen, block_m), batch * nheads)
        _fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    else:
        grid = lambda meta_: (triton.cdiv(seqlen, meta_["BLOCK_M"]), batch * nheads)  # noqa: E731
        _fwd_launcher()[grid](*args, **meta)
    return out_c, out_b, lse_c, lse_b


def dual_attention_bwd(q, k, v, out_c, out_b, lse_c, lse_b, dout_c, dout_b, softmax_scale: float):
    """Gradients w.r.t. q, k, v (contiguous, their dtypes). A None ``dout_c``/``dout_b`` means that output's
    gradient does not flow (its tiles are skipped when it is ``dout_b``). The upstream gradients may have any
    strides with a unit last-dim stride."""
    batch, seqlen, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    has_c, has_b = dout_c is not None, dout_b is not None
    if not (has_c or has_b):
        return dq.zero_(), dk.zero_(), dv.zero_()
    if q.numel() == 0:
        return dq, dk, dv
    # Per-row (lse, dO, D) triples for causal keys (C) and future keys (U); see the module docstring.
    n_rows = batch * nheads * seqlen
    rows = lambda: torch.empty((batch, nheads, seqlen), dtype=torch.float32, device=q.device)  # noqa: E731
    d_c, d_u, lse_c2, lse_u2 = rows(), rows(), rows(), rows()
    do_eff = torch.empty_like(q, memory_format=torch.contiguous_format) if has_c and has_b else None
    any_do, any_o, any_lse = (dout_c, out_c, lse_c) if has_c else (dout_b, out_b, lse_b)
    g_c = (dout_c, out_c, lse_c.contiguous()) if has_c else (any_do, any_o, any_lse)
    g_b = (dout_b, out_b, lse_b.contiguous()) if has_b else g_c
    block_r = 16 if triton_interpreted() else 64
    _bwd_preprocess_kernel[(triton.cdiv(n_rows, block_r),)](
        g_c[0], g_c[1], g_b[0], g_b[1], g_c[2], g_b[2], do_eff if do_eff is not None else q, d_c, d_u,
        lse_c2, lse_u2, seqlen, nheads, n_rows,
        g_c[0].stride(0), g_c[0].stride(1), g_c[0].stride(2), g_c[1].stride(0), g_c[1].stride(1), g_c[1].stride(2),
        g_b[0].stride(0), g_b[0].stride(1), g_b[0].stride(2), g_b[1].stride(0), g_b[1].stride(1), g_b[1].stride(2),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_R=block_r, HAS_C=has_c, HAS_B=has_b, num_warps=4)
    # dO for the causal keys: the combined tensor when both gradients flow, else the one that flows.
    do_c = do_eff if do_eff is not None else (dout_c if has_c else dout_b)
    do_u = dout_b if has_b else do_c
    qk_scale = softmax_scale * LOG2E
    group = nheads // nheads_k
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do_c.stride(0), do_c.stride(1), do_c.stride(2),
               do_u.stride(0), do_u.stride(1), do_u.stride(2))
    if triton_interpreted():
        block, warps, stages = _INTERP_BLOCK, 4, 1
    elif q.dtype == torch.float32:
        block, warps, stages = _FP32_BWD_CONFIG
    else:
        block, warps, stages = _BWD_CONFIG[_head_dim_key(head_dim)]
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK=block, HAS_U=has_b,
                PREC=_prec(q.dtype), num_warps=warps, num_stages=stages)
    row_args = (do_c, do_u, lse_c2, lse_u2, d_c, d_u)
    # dQ: atomically accumulated by the dK/dV programs, or (torch.use_deterministic_algorithms) by its own
    # kernel, which recomputes S and dP but adds in a fixed order.
    atomic = not torch.are_deterministic_algorithms_enabled()
    dq_acc = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic and q.dtype != torch.float32
              else dq.zero_() if atomic else dq)
    _bwd_dkdv_kernel[(triton.cdiv(seqlen, block), batch * nheads_k)](
        q, k, v, *row_args, dk, dv, dq_acc, seqlen, nheads, nheads_k, group, qk_scale, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), ATOMIC_DQ=atomic, **meta)
    if atomic:
        return (dq if dq_acc is dq else dq.copy_(dq_acc)), dk, dv
    _bwd_dq_kernel[(triton.cdiv(seqlen, block), batch * nheads)](
        q, k, v, *row_args, dq, seqlen, nheads, group, qk_scale, *strides,
        dq.stride(0), dq.stride(1), dq.stride(2), **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check
# ---------------------------------------------------------------------------------------------------------


def aot_specs() -> list[dict]:
    """Every kernel configuration this module launches on a GPU, for the sm_90 ahead-of-time compile check
    (``python -m mirai_kernels.triton.aot_check``); format of :func:`mirai_kernels.triton.rope.aot_specs`.
    Covered: fp16/bf16 at head dim 64 and 128, every autotuned forward config for both-outputs and causal-only
    (bidirectional-only runs the both-outputs kernel), and the backward kernels with and without the future
    tiles; fp32 with its single config."""
    specs = []
    strides3 = lambda prefix: {f"stride_{prefix}{x}": "i32" for x in "bsh"}  # noqa: E731
    for dtype in ("fp16", "bf16", "fp32"):
        prec = "ieee" if dtype == "fp32" else "tf32"
        for head_dim in (64, 128):
            fwd_configs = [_FP32_FWD_CONFIG] if dtype == "fp32" else _FWD_CONFIGS[head_dim]
            for block_m, block_n, warps, stages in fwd_configs:
                for causal, bidir in ((True, True), (True, False)):
                    sig = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "oc_ptr", "ob_ptr")}
                    sig.update({"lsec_ptr": "*fp32", "lseb_ptr": "*fp32", "seqlen": "i32", "nheads": "i32",
                                "group": "i32", "qk_scale": "fp32"})
                    for p in ("q", "k", "v", "o"):
                        sig.update(strides3(p))
                    specs.append({
                        "name": f"dual_attn_fwd[{dtype},hd{head_dim},M{block_m}N{block_n},"
                                f"{'both' if bidir else 'causal'}]",
                        "fn": _fwd_kernel, "signature": sig,
                        "constexprs": {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_M": block_m,
                                       "BLOCK_N": block_n, "CAUSAL": causal, "BIDIR": bidir, "PREC": prec},
                        "num_warps": warps, "num_stages": stages,
                    })
            block, warps, stages = _FP32_BWD_CONFIG if dtype == "fp32" else _BWD_CONFIG[head_dim]
            for has_u in (True, False):
                common = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "doc_ptr", "dou_ptr")}
                common.update({name: "*fp32" for name in ("lsec_ptr", "lseu_ptr", "dc_ptr", "du_ptr")})
                constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK": block, "HAS_U": has_u,
                              "PREC": prec}
                sig = dict(common, dk_ptr=f"*{dtype}", dv_ptr=f"*{dtype}", dq_acc_ptr="*fp32", seqlen="i32",
                           nheads="i32", nheads_k="i32", group="i32", qk_scale="fp32")
                for p in ("q", "k", "v", "g", "u", "dk"):
                    sig.update(strides3(p))
                for atomic in (True, False):
                    specs.append({"name": f"dual_attn_bwd_dkdv[{dtype},hd{head_dim},future={has_u},atomic_dq={atomic}]",
                                  "fn": _bwd_dkdv_kernel, "signature": sig,
                                  "constexprs": dict(constexprs, ATOMIC_DQ=atomic),
                                  "num_warps": warps, "num_stages": stages})
                sig = dict(common, dq_ptr=f"*{dtype}", seqlen="i32", nheads="i32", group="i32", qk_scale="fp32")
                for p in ("q", "k", "v", "g", "u", "dq"):
                    sig.update(strides3(p))
                specs.append({"name": f"dual_attn_bwd_dq[{dtype},hd{head_dim},future={has_u}]",
                              "fn": _bwd_dq_kernel, "signature": sig, "constexprs": constexprs,
                              "num_warps": warps, "num_stages": stages})
            for has_c, has_b in ((True, True), (True, False), (False, True)):
                sig = {name: f"*{dtype}" for name in ("doc_ptr", "oc_ptr", "dob_ptr", "ob_ptr", "doeff_ptr")}
                sig.update({name: "*fp32" for name in ("lsec_ptr", "lseb_ptr", "dc_ptr", "du_ptr", "lsec2_ptr",
                                                       "lseu2_ptr")})
                sig.update({"seqlen": "i32", "nheads": "i32", "n_rows": "i32"})
                for p in ("gc", "oc", "gb", "ob"):
                    sig.update(strides3(p))
                specs.append({"name": f"dual_attn_bwd_pre[{dtype},hd{head_dim},c={has_c},b={has_b}]",
                              "fn": _bwd_preprocess_kernel, "signature": sig,
                              "constexprs": {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_R": 64,
                                             "HAS_C": has_c, "HAS_B": has_b},
                              "num_warps": 4, "num_stages": 3})
    return specs
