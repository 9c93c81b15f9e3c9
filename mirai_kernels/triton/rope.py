"""Triton backend of the 2D RoPE: one program rotates a block of tokens of one head.

Each program loads the even and odd halves of every pair of a ``(BLOCK_T tokens, BLOCK_P pairs)`` tile with two
stride-2 loads (the other half of each 32-byte sector is then in L1, so this costs no extra DRAM traffic), gathers
the tokens' table rows, and writes a contiguous output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted


@triton.jit
def _rope_2d_kernel(
    x_ptr,
    table_ptr,
    positions_ptr,
    out_ptr,
    seqlen,
    n_tokens,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_pb,
    stride_ps,
    stride_ob,
    stride_os,
    stride_oh,
    HALF_DIM: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
    CONJUGATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    pair = tl.arange(0, BLOCK_P)
    token_ok = token < n_tokens
    pair_ok = pair < HALF_DIM
    mask = token_ok[:, None] & pair_ok[None, :]

    b = token // seqlen
    s = token % seqlen
    if HAS_POSITIONS:
        row = tl.load(positions_ptr + b * stride_pb + s * stride_ps, mask=token_ok, other=0)
    else:
        row = s
    # int64 offsets: batch * seqlen * nheads * head_dim overflows int32 for large decode caches.
    row_off = row.to(tl.int64)[:, None] * (HALF_DIM * 2) + pair[None, :] * 2
    cos = tl.load(table_ptr + row_off, mask=mask, other=0.0)
    sin = tl.load(table_ptr + row_off + 1, mask=mask, other=0.0)
    if CONJUGATE:
        sin = -sin

    x_off = b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs + head * stride_xh
    x_ptrs = x_ptr + x_off[:, None] + pair[None, :] * 2
    x0 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptrs + 1, mask=mask, other=0.0).to(tl.float32)

    o_off = b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + head * stride_oh
    o_ptrs = out_ptr + o_off[:, None] + pair[None, :] * 2
    tl.store(o_ptrs, (x0 * cos - x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + 1, (x1 * cos + x0 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def _gpu_block_tokens(half_dim: int) -> int:
    # ~2K pairs per program keeps 4 warps busy without spilling (two x loads + two table loads per pair).
    return max(1, 2048 // triton.next_power_of_2(half_dim))


def _block_tokens(half_dim: int) -> int:
    # The interpreter's cost is per program, so fewer, larger programs run faster there.
    return 64 if triton_interpreted() else _gpu_block_tokens(half_dim)


def apply_rope_2d(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor | None, conjugate: bool) -> torch.Tensor:
    """Launch the kernel. ``x`` (B, S, H, D) with unit last-dim stride; ``table`` (T, D/2, 2) fp32 contiguous;
    ``positions`` None, int32 (S,) or (B, S). Returns a new contiguous tensor of ``x``'s dtype."""
    batch, seqlen, nheads, head_dim = x.shape
    out = torch.empty((batch, seqlen, nheads, head_dim), dtype=x.dtype, device=x.device)
    n_tokens = batch * seqlen
    if n_tokens == 0 or nheads == 0:
        return out
    half_dim = head_dim // 2
    if positions is None:
        positions_arg, stride_pb, stride_ps = table, 0, 0  # any pointer: never read
    elif positions.dim() == 1:
        positions_arg, stride_pb, stride_ps = positions, 0, positions.stride(0)
    else:
        positions_arg, stride_pb, stride_ps = positions, positions.stride(0), positions.stride(1)
    block_t = _block_tokens(half_dim)
    grid = (triton.cdiv(n_tokens, block_t), nheads)
    _rope_2d_kernel[grid](
        x,
        table,
        positions_arg,
        out,
        seqlen,
        n_tokens,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        stride_pb,
        stride_ps,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        HALF_DIM=half_dim,
        HAS_POSITIONS=positions is not None,
        CONJUGATE=conjugate,
        BLOCK_T=block_t,
        BLOCK_P=triton.next_power_of_2(half_dim),
        num_warps=4,
    )
    return out


def aot_specs() -> list[dict]:
    """Every kernel configuration this module launches on a GPU, for the sm_90 ahead-of-time compile check
    (``python -m mirai_kernels.triton.aot_check``). Each entry: the jitted ``fn``, a ``signature`` mapping every
    non-constexpr argument to a Triton type, the ``constexprs``, ``num_warps`` and ``num_stages``."""
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for head_dim in (64, 128):
            for has_positions in (False, True):
                half_dim = head_dim // 2
                signature = {
                    "x_ptr": f"*{dtype}",
                    "table_ptr": "*fp32",
                    "positions_ptr": "*i32" if has_positions else "*fp32",
                    "out_ptr": f"*{dtype}",
                }
                signature.update(
                    {
                        name: "i32"
                        for name in (
                            "seqlen n_tokens stride_xb stride_xs stride_xh stride_pb stride_ps "
                            "stride_ob stride_os stride_oh"
                        ).split()
                    }
                )
                specs.append(
                    {
                        "name": f"rope_2d[{dtype},hd{head_dim},positions={has_positions}]",
                        "fn": _rope_2d_kernel,
                        "signature": signature,
                        "constexprs": {
                            "HALF_DIM": half_dim,
                            "HAS_POSITIONS": has_positions,
                            "CONJUGATE": False,
                            "BLOCK_T": _gpu_block_tokens(half_dim),
                            "BLOCK_P": triton.next_power_of_2(half_dim),
                        },
                        "num_warps": 4,
                        "num_stages": 3,
                    }
                )
    return specs
