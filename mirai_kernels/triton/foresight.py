"""Triton face of the shifted foresight cosine (see ``mirai_kernels/reference/foresight.py``).

One program handles ``BLOCK_R`` (batch, position) rows of one foresight head: it gathers each row's paired target
through the int32 ``tpos`` table (so no shifted or concatenated copy of the targets is ever made), and streams
``Z`` in ``BLOCK_Z`` chunks accumulating <s, t>, |s|^2 and |t|^2 in fp32. The backward recomputes those three sums
(one extra read of s and t, cheaper than storing normalised copies) and writes
``g * (t_hat - cos * s_hat) / |s|`` in a second pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ._compat import loop_bound

EPS = 1e-4  # must equal mirai_kernels.reference.foresight.EPS


@triton.jit
def _paired_rows(tpos_ptr, n_rows, seqlen, n_heads, stride_pb, stride_pn, stride_pk, stride_tb, stride_tn,
                 BLOCK_R: tl.constexpr):
    """This program's rows and head, which rows have a target (``tpos >= 0``), and where s and its target start."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1)
    row_ok = rows < n_rows
    b = rows // seqlen
    n = rows % seqlen
    q = tl.load(tpos_ptr + n * n_heads + k, mask=row_ok, other=-1)
    valid = row_ok & (q >= 0)
    s_base = b.to(tl.int64) * stride_pb + n.to(tl.int64) * stride_pn + k * stride_pk
    t_base = b.to(tl.int64) * stride_tb + tl.maximum(q, 0).to(tl.int64) * stride_tn
    return rows, k, row_ok, valid, s_base, t_base


@triton.jit
def _pair_sums(proj_ptr, tgt_ptr, s_base, t_base, valid, dim, BLOCK_R: tl.constexpr, BLOCK_Z: tl.constexpr):
    """<s, t>, |s|^2 and |t|^2 per row in fp32, streaming Z in BLOCK_Z chunks."""
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    tt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for z0 in range(0, loop_bound(dim), BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        m = valid[:, None] & (z < dim)[None, :]
        s = tl.load(proj_ptr + s_base[:, None] + z[None, :], mask=m, other=0.0).to(tl.float32)
        t = tl.load(tgt_ptr + t_base[:, None] + z[None, :], mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(s * t, axis=1)
        ss += tl.sum(s * s, axis=1)
        tt += tl.sum(t * t, axis=1)
    return dot, ss, tt


@triton.jit
def _foresight_cos_fwd_kernel(
    proj_ptr,
    tgt_ptr,
    tpos_ptr,
    cos_ptr,
    n_rows,
    seqlen,
    n_heads,
    dim,
    stride_pb,
    stride_pn,
    stride_pk,
    stride_tb,
    stride_tn,
    EPS_: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    rows, k, row_ok, valid, s_base, t_base = _paired_rows(tpos_ptr, n_rows, seqlen, n_heads, stride_pb, stride_pn,
                                                          stride_pk, stride_tb, stride_tn, BLOCK_R)
    dot, ss, tt = _pair_sums(proj_ptr, tgt_ptr, s_base, t_base, valid, dim, BLOCK_R, BLOCK_Z)
    cos = dot / (tl.maximum(tl.sqrt(ss), EPS_) * tl.maximum(tl.sqrt(tt), EPS_))
    cos = tl.where(valid, cos, 0.0)
    tl.store(cos_ptr + rows.to(tl.int64) * n_heads + k, cos, mask=row_ok)


@triton.jit
def _foresight_cos_bwd_kernel(
    grad_cos_ptr,
    proj_ptr,
    tgt_ptr,
    tpos_ptr,
    grad_ptr,
    cos_ptr,
    n_rows,
    seqlen,
    n_heads,
    dim,
    stride_pb,
    stride_pn,
    stride_pk,
    stride_tb,
    stride_tn,
    EPS_: tl.constexpr,
    WRITE_COS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    rows, k, row_ok, valid, s_base, t_base = _paired_rows(tpos_ptr, n_rows, seqlen, n_heads, stride_pb, stride_pn,
                                                          stride_pk, stride_tb, stride_tn, BLOCK_R)
    g = tl.load(grad_cos_ptr + rows.to(tl.int64) * n_heads + k, mask=valid, other=0.0)
    dot, ss, tt = _pair_sums(proj_ptr, tgt_ptr, s_base, t_base, valid, dim, BLOCK_R, BLOCK_Z)
    norm_s = tl.sqrt(ss)
    inv_s = 1.0 / tl.maximum(norm_s, EPS_)
    inv_t = 1.0 / tl.maximum(tl.sqrt(tt), EPS_)
    cos = dot * inv_s * inv_t
    if WRITE_COS:  # the fused op's forward needs the cosines too: one pass over s and t gives both
        tl.store(cos_ptr + rows.to(tl.int64) * n_heads + k, tl.where(valid, cos, 0.0), mask=row_ok)
    a = g * inv_t * inv_s
    # Below eps the norm is the constant eps, so only the t_hat / eps term is left.
    c = tl.where(norm_s >= EPS_, g * cos * inv_s * inv_s, 0.0)
    # The output is contiguous (B, N, K, Z): row r, head k starts at (r * K + k) * Z.
    o_base = (rows.to(tl.int64) * n_heads + k) * dim
    for z0 in range(0, loop_bound(dim), BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        m = valid[:, None] & (z < dim)[None, :]
        s = tl.load(proj_ptr + s_base[:, None] + z[None, :], mask=m, other=0.0).to(tl.float32)
        t = tl.load(tgt_ptr + t_base[:, None] + z[None, :], mask=m, other=0.0).to(tl.float32)
        grad = a[:, None] * t - c[:, None] * s
        store_mask = row_ok[:, None] & (z < dim)[None, :]
        tl.store(grad_ptr + o_base[:, None] + z[None, :], grad.to(grad_ptr.dtype.element_ty), mask=store_mask)


def _gpu_blocks(dim: int) -> tuple[int, int]:
    # ~2K elements per load tile keeps 4 warps busy with a few registers per thread per operand.
    block_z = min(256, triton.next_power_of_2(max(dim, 1)))
    return max(1, 2048 // block_z), block_z


def _blocks(dim: int) -> tuple[int, int]:
    if triton_interpreted():
        # The interpreter's cost is per program and per loop step: few, large tiles.
        block_z = min(1024, triton.next_power_of_2(max(dim, 1)))
        return 64, block_z
    return _gpu_blocks(dim)


def _launch_args(proj: torch.Tensor, targets: torch.Tensor):
    batch, seqlen, n_heads, dim = proj.shape
    return (
        batch * seqlen,
        seqlen,
        n_heads,
        dim,
        proj.stride(0),
        proj.stride(1),
        proj.stride(2),
        targets.stride(0),
        targets.stride(1),
    )


def foresight_cos_fwd(proj: torch.Tensor, targets: torch.Tensor, tpos: torch.Tensor) -> torch.Tensor:
    """``proj`` (B, N, K, Z) and ``targets`` (B, N, Z) of one dtype with unit last-dim stride, ``tpos`` contiguous
    int32 (N, K). Returns the fp32 cosines (B, N, K), 0 for unpaired entries."""
    batch, seqlen, n_heads, dim = proj.shape
    cos = torch.empty((batch, seqlen, n_heads), dtype=torch.float32, device=proj.device)
    if cos.numel() == 0:
        return cos
    block_r, block_z = _blocks(dim)
    grid = (triton.cdiv(batch * seqlen, block_r), n_heads)
    _foresight_cos_fwd_kernel[grid](
        proj, targets, tpos, cos, *_launch_args(proj, targets), EPS_=EPS, BLOCK_R=block_r, BLOCK_Z=block_z,
        num_warps=4,
    )
    return cos


def foresight_cos_bwd(grad_cos: torch.Tensor, proj: torch.Tensor, targets: torch.Tensor,
                      tpos: torch.Tensor, cos_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of ``sum(grad_cos * foresight_cos_fwd(proj, targets, tpos))`` w.r.t. ``proj``: a contiguous
    (B, N, K, Z) tensor of ``proj``'s dtype. ``cos_out`` (contiguous fp32 (B, N, K)), when given, also receives
    the cosines."""
    grad = torch.empty(proj.shape, dtype=proj.dtype, device=proj.device)
    if grad.numel() == 0:
        return grad
    batch, seqlen, n_heads, dim = proj.shape
    grad_cos = grad_cos.to(torch.float32).contiguous()
    block_r, block_z = _blocks(dim)
    grid = (triton.cdiv(batch * seqlen, block_r), n_heads)
    _foresight_cos_bwd_kernel[grid](
        grad_cos, proj, targets, tpos, grad, cos_out if cos_out is not None else grad_cos,
        *_launch_args(proj, targets), EPS_=EPS, WRITE_COS=cos_out is not None, BLOCK_R=block_r, BLOCK_Z=block_z,
        num_warps=4,
    )
    return grad


def aot_specs() -> list[dict]:
    """Every kernel configuration this module launches on a GPU for the shipped Z sizes, for the sm_90
    ahead-of-time compile check. Format as ``mirai_kernels.triton.rope.aot_specs``."""
    specs = []
    scalar_args = (
        "n_rows seqlen n_heads dim stride_pb stride_pn stride_pk stride_tb stride_tn"
    ).split()
    for dtype in ("fp32", "fp16", "bf16"):
        for dim in (768, 1024, 1280):
            block_r, block_z = _gpu_blocks(dim)
            constexprs = {"EPS_": EPS, "BLOCK_R": block_r, "BLOCK_Z": block_z}
            bwd_constexprs = {"EPS_": EPS, "WRITE_COS": False, "BLOCK_R": block_r, "BLOCK_Z": block_z}
            fwd_sig = {"proj_ptr": f"*{dtype}", "tgt_ptr": f"*{dtype}", "tpos_ptr": "*i32", "cos_ptr": "*fp32"}
            fwd_sig.update({name: "i32" for name in scalar_args})
            bwd_sig = {
                "grad_cos_ptr": "*fp32",
                "proj_ptr": f"*{dtype}",
                "tgt_ptr": f"*{dtype}",
                "tpos_ptr": "*i32",
                "grad_ptr": f"*{dtype}",
                "cos_ptr": "*fp32",
            }
            bwd_sig.update({name: "i32" for name in scalar_args})
            for name, fn, sig, cexpr in (
                ("foresight_cos_fwd", _foresight_cos_fwd_kernel, fwd_sig, constexprs),
                ("foresight_cos_bwd", _foresight_cos_bwd_kernel, bwd_sig, bwd_constexprs),
                ("foresight_cos_fwd_bwd", _foresight_cos_bwd_kernel, bwd_sig, dict(bwd_constexprs, WRITE_COS=True)),
            ):
                specs.append(
                    {
                        "name": f"{name}[{dtype},Z{dim}]",
                        "fn": fn,
                        "signature": sig,
                        "constexprs": dict(cexpr),
                        "num_warps": 4,
                        "num_stages": 3,
                    }
                )
    return specs
