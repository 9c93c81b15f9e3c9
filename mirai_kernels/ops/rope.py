"""The door of the 2D RoPE op: input checks, one ``torch.ops.mirai`` op per fast face, and the public functions.

This module is the pattern every op copies:

* **one registered op per face**, ``mirai::<op>_<face>``: ``apply_rope_2d_cpp`` (csrc/rope.cpp, CPU),
  ``apply_rope_2d_cuda`` (csrc/cuda/rope.cu, CUDA), ``apply_rope_2d_triton`` (``torch.library.custom_op`` here;
  CUDA, or CPU under the interpreter). Each is reachable on its own, carries a fake kernel and an autograd formula,
  and passes ``opcheck`` on its own. The reference face is plain PyTorch and differentiates through autograd;
* C++ faces define their schema in C++ (so ``torch.ops.mirai`` lists them as soon as the extension loads);
  fake kernels and autograd are registered here, in Python, for every face op that exists in this build;
* the public function checks its inputs (clear messages: shape, dtype, device, strides), resolves the face with
  :func:`mirai_kernels.backend.select_face`, and calls it.

Autocast: the RoPE ops have no autocast rule. Under ``torch.autocast`` they compute in fp32 and return ``x``'s
dtype, exactly as outside it (like LlamaGen's ``apply_rotary_emb``), so an fp32 ``x`` stays fp32 and a bf16 ``x``
stays bf16.

Gradients: the rotation is orthogonal, so ``grad_x`` is ``grad_out`` rotated by the opposite angle — the same face
op with ``conjugate`` flipped (which is differentiable in turn, so double backward works). The table and the
positions get no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backend as _backend
from ..reference import rope as _reference
from . import _checks

OP = "apply_rope_2d"
_backend.register_op_faces(OP, ("reference", "triton", "cpp", "cuda"))

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Face ops
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mirai::apply_rope_2d_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _apply_rope_2d_triton(x: torch.Tensor, table: torch.Tensor, positions: Optional[torch.Tensor], conjugate: bool) -> torch.Tensor:
    from ..triton import rope as kernels  # lazy: Triton is optional and reads TRITON_INTERPRET when it decorates

    return kernels.apply_rope_2d(x, table, positions, conjugate)


def _fake(x, table, positions, conjugate):
    return x.new_empty(x.shape)  # contiguous, like every face


def _register_fake_and_autograd(qualname: str) -> None:
    op_name = qualname.split("::")[1]

    def setup_context(ctx, inputs, output):
        _, table, positions, conjugate = inputs
        ctx.save_for_backward(table, positions)
        ctx.conjugate = conjugate

    def backward(ctx, grad_out):
        table, positions = ctx.saved_tensors
        # Faces require a unit last-dim stride; autograd can hand expanded or transposed gradients.
        if grad_out.dim() == 4 and grad_out.size(-1) > 1 and grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        grad_x = getattr(torch.ops.mirai, op_name)(grad_out, table, positions, not ctx.conjugate)
        return grad_x, None, None, None

    torch.library.register_fake(qualname)(_fake)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


_register_fake_and_autograd("mirai::apply_rope_2d_triton")
if _backend.cpp_available():
    _register_fake_and_autograd("mirai::apply_rope_2d_cpp")
if _backend.cuda_ext_available():
    _register_fake_and_autograd("mirai::apply_rope_2d_cuda")


def face_op(face: str):
    """The ``torch.ops.mirai`` op behind ``face`` (``triton``, ``cpp`` or ``cuda``), for tests and opcheck."""
    return getattr(torch.ops.mirai, f"{OP}_{face}").default


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def rope_2d_table(grid, head_dim: int, prefix: int = 1, base: float = 10000.0, *, device=None) -> torch.Tensor:
    """Build LlamaGen's 2D RoPE table.

    Arguments:
        grid: ``(H, W)`` token grid in raster order, or an int for a square ``H = W = grid``.
        head_dim: attention head dim, divisible by 4 (pairs split evenly between rows and columns).
        prefix: number of leading non-image tokens (the class token; LlamaGen: 1). Their rows are **zero**
            (cos = sin = 0), so the rotated class-token q and k are zero vectors, as in LlamaGen.
        base: frequency base; pair ``i`` of each half rotates at ``base ** (-2i / (head_dim/2))``.
        device: where to build the table.
    Return:
        table: ``(prefix + H*W, head_dim/2, 2)`` float32 contiguous, ``[..., 0] = cos``, ``[..., 1] = sin``. Row
        ``prefix + r*W + c`` rotates pairs ``< head_dim/4`` by ``r * f`` and the rest by ``c * f``.
    """
    height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if not all(isinstance(v, int) and v > 0 for v in (height, width)):
        raise ValueError(f"rope_2d_table: grid must be a positive int or an (H, W) pair of positive ints, got {grid!r}")
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 4:
        raise ValueError(f"rope_2d_table: head_dim must be a positive multiple of 4 (row and column halves of "
                         f"interleaved pairs), got {head_dim!r}")
    if not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"rope_2d_table: prefix must be a non-negative int, got {prefix!r}")
    return _reference.rope_2d_table((height, width), head_dim, prefix, base, device=device)


def _check_inputs(x: torch.Tensor, table: torch.Tensor, positions: Optional[torch.Tensor]) -> None:
    where = "apply_rope_2d"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be a 4-D (batch, seqlen, nheads, head_dim) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"{where}: head_dim must be even, got {head_dim}")
    if head_dim > 1 and x.stride(-1) != 1:
        raise ValueError(f"{where}: x must have a unit stride in its last dim (got strides {x.stride()}); "
                         "strided views of a fused qkv are fine, a transposed head_dim is not")
    if not isinstance(table, torch.Tensor) or table.dim() != 3 or table.shape[1:] != (head_dim // 2, 2):
        raise ValueError(f"{where}: table must be (rows, head_dim/2 = {head_dim // 2}, 2) as built by "
                         f"rope_2d_table, got {tuple(table.shape) if isinstance(table, torch.Tensor) else table!r}")
    if table.dtype != torch.float32:
        raise TypeError(f"{where}: table must be float32, got {table.dtype}")
    if not table.is_contiguous():
        raise ValueError(f"{where}: table must be contiguous")
    if table.device != x.device:
        raise ValueError(f"{where}: table is on {table.device} but x is on {x.device}")
    if positions is None:
        if x.shape[1] > table.shape[0]:
            raise ValueError(f"{where}: seqlen {x.shape[1]} exceeds the table's {table.shape[0]} rows "
                             "(build the table for a larger grid, or pass positions)")
        return
    if positions.dtype != torch.int32:
        raise TypeError(f"{where}: positions must be int32, got {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(f"{where}: positions is on {positions.device} but x is on {x.device}")
    if tuple(positions.shape) not in ((x.shape[1],), (x.shape[0], x.shape[1])):
        raise ValueError(f"{where}: positions must be (seqlen,) = ({x.shape[1]},) or (batch, seqlen) = "
                         f"({x.shape[0]}, {x.shape[1]}), got {tuple(positions.shape)}")
    # Reading device values syncs the GPU with the host, so on GPU this runs only under MIRAI_DEBUG=1.
    if positions.numel() and (positions.device.type == "cpu" or _backend.debug_checks()):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= table.shape[0]:
            raise IndexError(f"{where}: positions must lie in [0, {table.shape[0]}), got values in [{lo}, {hi}]")


def apply_rope_2d(x: torch.Tensor, table: torch.Tensor, positions: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Rotate queries or keys with LlamaGen's 2D RoPE.

    Arguments:
        x: ``(batch, seqlen, nheads, head_dim)``, float16 / bfloat16 / float32 (float64: reference and C++
            faces). Any strides with a unit last-dim stride (q, k may be views of a fused qkv projection).
        table: ``(rows, head_dim/2, 2)`` float32 contiguous, from :func:`rope_2d_table`, on ``x``'s device.
        positions: optional int32 table rows, ``(seqlen,)`` shared by the batch or ``(batch, seqlen)``
            (decoding: row ``prefix + cell`` of each new token). Default: rows ``0 .. seqlen-1`` (training:
            ``[cls, z_0, ...]``). Range-checked on CPU; on GPU only with ``MIRAI_DEBUG=1`` (no host sync).
        backend: ``None`` (current default, see :mod:`mirai_kernels.backend`), ``"auto"``, ``"reference"``,
            ``"triton"``, ``"cpp"`` or ``"cuda"``.
    Return:
        out: ``(batch, seqlen, nheads, head_dim)`` contiguous, ``x``'s dtype, computed in fp32 (fp64 for fp64).
        Differentiable w.r.t. ``x``; the table and positions get no gradient.
    """
    _check_inputs(x, table, positions)
    face = _backend.select_face(OP, x.device, backend)
    _checks.check_face_dtype("apply_rope_2d", face, x.dtype, fp64_faces=("reference", "cpp", "cuda"))
    face = _checks.face_for(face, x)  # empty: an empty output, no launch
    if face == "reference":
        return _reference.apply_rope_2d(x, table, positions)
    return getattr(torch.ops.mirai, f"{OP}_{face}")(x, table, positions, False)
