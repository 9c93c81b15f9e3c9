"""The door of the 2D RoPE op: its declaration (backends, schema, fake kernel, autograd), input checks, and the
public functions.

Declared with :func:`mirai_kernels.ops._registry.declare` (every op's pattern): ``mirai::apply_rope_2d`` carries
the compiled backends (``cpp``: its CPU kernel, csrc/rope.cpp; ``cuda``: its CUDA kernel, csrc/cuda/rope.cu) and
``mirai::apply_rope_2d_triton`` the Triton one (CUDA, or CPU under the interpreter); each has a fake kernel and an
autograd formula and passes ``opcheck``. The ``reference`` backend is plain PyTorch and differentiates through
autograd. The public function checks its inputs (clear messages: shape, dtype, device, strides), picks the backend
with :meth:`~mirai_kernels.ops._registry.Op.select`, and calls it.

Autocast: the RoPE ops have no autocast rule. Under ``torch.autocast`` they compute in fp32 and return ``x``'s
dtype, exactly as outside it (like LlamaGen's ``apply_rotary_emb``), so an fp32 ``x`` stays fp32 and a bf16 ``x``
stays bf16.

Gradients: the rotation is orthogonal, so ``grad_x`` is ``grad_out`` rotated by the opposite angle — the same op
with ``conjugate`` flipped (which is differentiable in turn, so double backward works). The table and the positions
get no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backend as _backend
from ..reference import rope as _reference
from . import _checks, _registry


def _triton(x, table, positions, conjugate):
    from ..triton import rope as kernels  # lazy: Triton is optional and reads TRITON_INTERPRET when it decorates

    return kernels.apply_rope_2d(x, table, positions, conjugate)


def _fake(x, table, positions, conjugate):
    return x.new_empty(x.shape)  # contiguous, like every backend


def _autograd(ops):
    rotate = ops[""]

    def setup_context(ctx, inputs, output):
        _, table, positions, conjugate = inputs
        ctx.save_for_backward(table, positions)
        ctx.conjugate = conjugate

    def backward(ctx, grad_out):
        table, positions = ctx.saved_tensors
        grad_x = rotate(_checks.unit_last_stride(grad_out), table, positions, not ctx.conjugate)
        return grad_x, None, None, None

    return backward, setup_context


OP = _registry.declare(
    "apply_rope_2d",
    faces=("reference", "triton", "cpp", "cuda"),
    fp64_faces=("reference", "cpp", "cuda"),
    stages={"": _registry.Stage("(Tensor x, Tensor table, Tensor? positions, bool conjugate) -> Tensor",
                                triton=_triton, fake=_fake, autograd=_autograd)},
)


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
    _checks.check_rank(where, "x", x, "(batch, seqlen, nheads, head_dim)")
    _checks.check_float(where, "x", x)
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"{where}: head_dim must be even, got {head_dim}")
    _checks.check_unit_stride(where, "x", x)
    _checks.check_rope_table(where, "table", table, head_dim, "x", x)
    if positions is None:
        if x.shape[1] > table.shape[0]:
            raise ValueError(f"{where}: seqlen {x.shape[1]} exceeds the table's {table.shape[0]} rows "
                             "(build the table for a larger grid, or pass positions)")
        return
    if positions.dtype != torch.int32:
        raise TypeError(f"{where}: positions must be int32, got {positions.dtype}")
    _checks.check_device(where, "positions", positions, "x", x)
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
            backends). Any strides with a unit last-dim stride (q, k may be views of a fused qkv projection).
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
    face = OP.select(x.device, backend, x.dtype, x)  # empty: an empty output, no launch
    if face == "reference":
        return _reference.apply_rope_2d(x, table, positions)
    return OP.op(face)(x, table, positions, False)
