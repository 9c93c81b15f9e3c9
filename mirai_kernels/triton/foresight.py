"""Triton backend of the shifted foresight cosine (see ``mirai_kernels/reference/foresight.py``).

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
from ..reference.foresight import EPS, acc_dtype
from ._compat import loop_bound


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


def chunk_batches(batch: int, seqlen: int, chunk_rows: int) -> list[tuple[int, int]]:
    """``[(b0, b1), ...]``: batches of whole sequences (a pair never leaves its sample) of at most ``chunk_rows``
    rows (batch * positions), at least one sequence each."""
    step = max(1, chunk_rows // max(1, seqlen))
    return [(b0, min(batch, b0 + step)) for b0 in range(0, batch, step)]


def fused_linear_cos(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     tpos: torch.Tensor, compute_grad: bool, silu_input: bool, chunk_rows: int,
                     grad_scale: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backend of ``fused_linear_cosine_loss`` (contract: :mod:`mirai_kernels.ops.foresight`). The same
    algorithm as ``fused_linear_cos_cpu`` in csrc/foresight.cpp: per foresight head and chunk of whole sequences,
    the projection by the vendor GEMM, the cosines (and their gradient) by the kernels above, the input and weight
    gradients by GEMMs whose alpha applies ``grad_scale[k]``."""
    batch, seqlen, n_heads, hidden = x.shape
    z_dim = weight.shape[1]
    acc = acc_dtype(x.dtype)
    per_head = torch.zeros(n_heads, dtype=acc, device=x.device)
    chunks = chunk_batches(batch, seqlen, chunk_rows)
    # The weight gradient is kept until backward in x's dtype (as an eager bf16 Linear makes it); across several
    # chunks it is accumulated in fp32 first.
    gw_dtype = x.dtype if len(chunks) == 1 else acc
    if compute_grad:
        # (K, B, N, H) buffer: each head's chunk is contiguous, so the GEMMs write into it directly.
        gx_heads = torch.empty((n_heads, batch, seqlen, hidden), dtype=x.dtype, device=x.device)
        gx = gx_heads.permute(1, 2, 0, 3)
        gw = torch.empty((n_heads, z_dim, hidden), dtype=gw_dtype, device=x.device)  # the first chunk's GEMM writes it
        gb = torch.zeros((n_heads, z_dim), dtype=acc, device=x.device)
    else:
        gx, gw, gb = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if batch * seqlen * n_heads == 0:
        if compute_grad:  # no row: the GEMMs that would write gx and gw never run; the gradients are zeros
            gx.zero_()
            gw.zero_()
        return per_head, gx, gw.to(x.dtype), gb.to(x.dtype)
    counts = (tpos >= 0).sum(0).to(acc) * batch
    for k in range(n_heads):
        tk = tpos[:, k:k + 1].contiguous()
        wk = weight[k]
        for b0, b1 in chunks:
            bc = b1 - b0
            xin = x[b0:b1, :, k].reshape(bc * seqlen, hidden)
            xk = torch.nn.functional.silu(xin) if silu_input else xin
            p = torch.addmm(bias[k], xk, wk.t()) if bias is not None else xk @ wk.t()
            p = p.view(bc, seqlen, 1, z_dim)
            tch = targets[b0:b1]
            if not compute_grad:
                per_head[k] -= foresight_cos_fwd(p, tch, tk).sum()
            else:
                c = torch.empty((bc, seqlen, 1), dtype=torch.float32, device=x.device)
                dp = foresight_cos_bwd(torch.full_like(c, -1.0), p, tch, tk, cos_out=c)
                dp = dp.view(bc * seqlen, z_dim)
                per_head[k] -= c.sum()
                # The GEMMs' alpha applies grad_scale[k] for free (beta = 0: the uninitialised output is not read).
                sk = grad_scale[k]
                out = gx_heads[k, b0:b1].view(bc * seqlen, hidden)
                if silu_input:
                    torch.ops.aten.silu_backward.grad_input((dp @ wk).mul_(sk), xin, grad_input=out)
                else:
                    out.addmm_(dp, wk, beta=0, alpha=sk)
                if gw.dtype == x.dtype:
                    gw[k].addmm_(dp.t(), xk, beta=0 if b0 == 0 else 1, alpha=sk)
                elif b0 == 0:
                    gw[k].copy_((dp.t() @ xk).mul_(sk))
                else:
                    gw[k].add_((dp.t() @ xk).to(acc), alpha=sk)
                gb[k].add_(dp.sum(0, dtype=acc), alpha=sk)
    per_head /= counts.clamp(min=1)
    return per_head, gx, gw.to(x.dtype), gb.to(x.dtype)


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
