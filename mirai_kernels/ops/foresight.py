"""The door of the foresight loss ops: pairing, input checks, one ``torch.ops.mirai`` op per fast face, the public
functions ``foresight_cosine_loss``, ``fused_linear_cosine_loss`` and ``grid_to_sequence``.

Faces (pattern of :mod:`mirai_kernels.ops.rope`):

* ``foresight_cosine_loss``: ``foresight_cos_fwd_<face>(proj, targets, tpos) -> cos (B, N, K)`` and
  ``foresight_cos_bwd_<face>(grad_cos, proj, targets, tpos) -> grad_proj``, face ``cpp`` (csrc/foresight.cpp) or
  ``triton`` (``custom_op`` here). ``tpos`` is the int32 ``(N, K)`` pairing table (target position per student
  position and foresight head, -1 for none), so no shifted, concatenated or normalised copy of anything is made; the
  per-head means are a ``(B, N, K) -> (K,)`` sum in PyTorch. The forward op is differentiable (autograd formula =
  the bwd op), with no gradient to the targets.
* ``fused_linear_cosine_loss``: ``fused_linear_cos_<face>(x, weight, bias, targets, tpos, compute_grad,
  silu_input, chunk_rows, grad_scale) -> (per_head, grad_x, grad_weight, grad_bias)`` (the gradients in x's
  dtype, for the upstream gradient ``grad_scale[k] * B * pairs_k`` of ``per_head[k]``). The heads' last
  ``Linear(hidden -> Z)`` runs per foresight head in chunks of whole sequences (cuBLAS / MKL GEMMs), followed by
  the cosine kernels on each chunk's projection, which is then dropped. **Gradients are computed in the forward
  pass** (the fused-linear-loss pattern) and scaled per head by the upstream gradient in backward: exact for any
  upstream ``(K,)`` gradient, since each head's projection only reaches its own ``per_head[k]``. The gradients are
  computed for the *expected* upstream (``head_weights``; the GEMMs' alpha applies it for free); backward returns
  them untouched when the real upstream matches (checked on CPU only, where reading it costs no sync) and
  rescales them (one pass, fp32 math) otherwise.

  Chosen by measurement against a chunked recompute in backward (projection recomputed chunk by chunk from a saved
  x: one more GEMM per head). CPU, fp32, 2 threads on a shared, loaded 2-core machine, B=4, N=255, K=3,
  hidden=2048, Z=768, forward+backward, min of 5 interleaved runs (``benchmarks/foresight_bench.py`` providers
  ``mirai_cpp`` / ``recompute_cpp`` / ``eager``): gradients-in-forward 335-415 ms, recompute 488-700 ms, eager
  487-1257 ms. Saved-tensor bytes at GPT-B's B=32 (fp32 / bf16 alike, parameters excluded): gradients-in-forward
  0.63x eager, recompute 0.65x (it keeps x and the targets; the stored grad_x has x's size and x itself is then not
  saved; the weight gradient is kept in x's dtype). Under ``no_grad`` (or when nothing requires grad) only the
  loss is computed.

Autocast: no autocast rule; ``targets`` must have ``proj``'s (``x``'s) dtype (cast the teacher's fp32 state),
cosines are computed in fp32 (fp64 for fp64 inputs), losses are fp32 (fp64).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import backend as _backend
from ..reference import foresight as _reference
from . import _checks

OP = "foresight_cosine_loss"
FUSED_OP = "fused_linear_cosine_loss"
_backend.register_op_faces(OP, ("reference", "triton", "cpp"))
_backend.register_op_faces(FUSED_OP, ("reference", "triton", "cpp"))

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

parse_offsets = _reference.parse_offsets


# ---------------------------------------------------------------------------------------------------------
# Face ops
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mirai::foresight_cos_fwd_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _foresight_cos_fwd_triton(proj: torch.Tensor, targets: torch.Tensor, tpos: torch.Tensor) -> torch.Tensor:
    from ..triton import foresight as kernels  # lazy: Triton is optional and reads TRITON_INTERPRET when it decorates

    return kernels.foresight_cos_fwd(proj, targets, tpos)


@torch.library.custom_op("mirai::foresight_cos_bwd_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _foresight_cos_bwd_triton(grad_cos: torch.Tensor, proj: torch.Tensor, targets: torch.Tensor,
                              tpos: torch.Tensor) -> torch.Tensor:
    from ..triton import foresight as kernels

    return kernels.foresight_cos_bwd(grad_cos, proj, targets, tpos)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Rows (batch * positions) per chunk of the fused op: bounds its live (rows, Z) projection and gradient. Whole
# sequences only (a pair never leaves its sample). GPT-B: 8192 = all 32 x 256 rows of a head in one GEMM.
CHUNK_ROWS = 8192


def _chunk_batches(batch: int, seqlen: int, chunk_rows: int = CHUNK_ROWS) -> list[tuple[int, int]]:
    step = max(1, chunk_rows // max(1, seqlen))
    return [(b0, min(batch, b0 + step)) for b0 in range(0, batch, step)]


@torch.library.custom_op("mirai::fused_linear_cos_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _fused_linear_cos_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, tpos: torch.Tensor, compute_grad: bool, silu_input: bool,
                             chunk_rows: int,
                             grad_scale: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Same algorithm as fused_linear_cos_cpu in csrc/foresight.cpp: GEMMs by the vendor library, cosines by Triton.
    from ..triton import foresight as kernels

    batch, seqlen, n_heads, hidden = x.shape
    z_dim = weight.shape[1]
    acc = _acc_dtype(x.dtype)
    per_head = torch.zeros(n_heads, dtype=acc, device=x.device)
    chunks = _chunk_batches(batch, seqlen, chunk_rows)
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
                per_head[k] -= kernels.foresight_cos_fwd(p, tch, tk).sum()
            else:
                c = torch.empty((bc, seqlen, 1), dtype=torch.float32, device=x.device)
                dp = kernels.foresight_cos_bwd(torch.full_like(c, -1.0), p, tch, tk, cos_out=c)
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


def _fake_cos_fwd(proj, targets, tpos):
    return proj.new_empty(proj.shape[:3], dtype=_acc_dtype(proj.dtype))


def _fake_cos_bwd(grad_cos, proj, targets, tpos):
    return proj.new_empty(proj.shape)


def _fake_fused(x, weight, bias, targets, tpos, compute_grad, silu_input, chunk_rows, grad_scale):
    acc = _acc_dtype(x.dtype)
    n_heads = x.shape[2]
    per_head = x.new_empty((n_heads,), dtype=acc)
    if compute_grad:
        grad_x = x.new_empty((n_heads, x.shape[0], x.shape[1], x.shape[3])).permute(1, 2, 0, 3)
        return per_head, grad_x, x.new_empty(weight.shape), x.new_empty(weight.shape[:2])
    return per_head, x.new_empty(0), x.new_empty(0), x.new_empty(0)


def _register_cos(face: str) -> None:
    fwd, bwd = f"mirai::foresight_cos_fwd_{face}", f"mirai::foresight_cos_bwd_{face}"
    bwd_op = getattr(torch.ops.mirai, f"foresight_cos_bwd_{face}")

    def setup_context(ctx, inputs, output):
        proj, targets, tpos = inputs
        ctx.save_for_backward(proj, targets, tpos)

    def backward(ctx, grad_cos):
        proj, targets, tpos = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the bwd kernel has no derivative of its own, so this backward is
            # the reference's, differentiated by autograd, instead of silently zero second-order terms.
            with torch.enable_grad():
                leaf = proj if proj.requires_grad else proj.detach().requires_grad_()
                cos = _reference.pairwise_cosine(leaf, targets, tpos)
                (grad_proj,) = torch.autograd.grad(cos, leaf, grad_cos.to(cos.dtype), create_graph=True)
            return grad_proj.to(proj.dtype), None, None
        return bwd_op(grad_cos, proj, targets, tpos), None, None

    torch.library.register_fake(fwd)(_fake_cos_fwd)
    torch.library.register_fake(bwd)(_fake_cos_bwd)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def _eager_cpu(t: torch.Tensor) -> bool:
    """True for a plain CPU tensor outside any tracing (compile, make_fx, fake or functional modes), where
    reading its values is free and changes no graph."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (t.device.type == "cpu" and type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._is_functional_tensor(t))


def _register_fused(face: str) -> None:
    qualname = f"mirai::fused_linear_cos_{face}"

    def setup_context(ctx, inputs, output):
        x, weight, bias, targets, tpos, compute_grad, _silu_input, _chunk_rows, grad_scale = inputs
        ctx.grad_scale = list(grad_scale)
        _, gx, gw, gb = output
        ctx.mark_non_differentiable(gx, gw, gb)
        ctx.set_materialize_grads(False)  # no zero-filled x- and weight-sized grads for the unused outputs
        ctx.compute_grad = compute_grad
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(gx, gw, gb, tpos)
        ctx.batch = x.shape[0]

    def backward(ctx, grad_per_head, _gx, _gw, _gb):
        if not ctx.compute_grad:
            raise RuntimeError(
                "fused_linear_cos: backward through a call made with compute_grad=False (the gradients are "
                "computed in the forward pass; call it with grad enabled and inputs that require grad)"
            )
        if grad_per_head is None:
            return (None,) * 9
        if torch.is_grad_enabled():
            # The gradients were computed in the forward pass, as constants: a second-order gradient through them
            # would silently be zero.
            raise RuntimeError(
                "fused_linear_cosine_loss: no double backward (backward with create_graph=True): its gradients "
                "are computed in the forward pass. Use backend='reference', or foresight_cosine_loss on the "
                "projections, for higher-order gradients"
            )
        gx, gw, gb, tpos = ctx.saved_tensors
        n_heads = gw.shape[0]
        counts = ((tpos >= 0).sum(0).to(grad_per_head.dtype) * ctx.batch).clamp(min=1)
        # The saved gradients already carry grad_scale[k] = expected upstream / (B * pairs); rescale by
        # real / expected. When they agree (total.backward() with the head_weights given: the usual case) and the
        # check costs no GPU sync, the saved gradients are returned as they are.
        expected = torch.tensor(ctx.grad_scale, dtype=torch.float64) * counts.cpu().double()
        scale = grad_per_head / expected.to(device=grad_per_head.device, dtype=grad_per_head.dtype)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if _eager_cpu(grad_per_head) and bool((scale == 1).all()):
            return (gx if ctx.needs_input_grad[0] else None,
                    gw.to(w_dtype) if ctx.needs_input_grad[1] else None,
                    gb.to(b_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None,
                    None, None, None, None, None, None)
        # The products are computed in fp32 (the scale's dtype) and rounded once into the output's dtype: a bf16 or
        # fp16 copy of the scale would bias every gradient of head k by its rounding error. Out of place: scaling
        # the saved tensor in place breaks AOT autograd's partitioner (torch.compile).
        def scaled(saved, shape, dtype):
            return torch.mul(saved, scale.view(shape), out=torch.empty_like(saved, dtype=dtype))

        grad_x = scaled(gx, (1, 1, n_heads, 1), x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = scaled(gw, (n_heads, 1, 1), w_dtype) if ctx.needs_input_grad[1] else None
        grad_b = scaled(gb, (n_heads, 1), b_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None

    torch.library.register_fake(qualname)(_fake_fused)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


_register_cos("triton")
_register_fused("triton")
if _backend.cpp_available() and hasattr(torch.ops.mirai, "foresight_cos_fwd_cpp"):
    _register_cos("cpp")
    _register_fused("cpp")


def face_ops(face: str) -> dict:
    """The ``torch.ops.mirai`` ops behind ``face`` (``triton`` or ``cpp``), for tests and opcheck."""
    return {
        "fwd": getattr(torch.ops.mirai, f"foresight_cos_fwd_{face}").default,
        "bwd": getattr(torch.ops.mirai, f"foresight_cos_bwd_{face}").default,
        "fused": getattr(torch.ops.mirai, f"fused_linear_cos_{face}").default,
    }


# ---------------------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------------------

_TPOS_CACHE: dict = {}


def pairing_table(seqlen: int, grid, offsets, *, prefix: int = 1, boundary: str = "raster",
                  align_prefix: bool = True, device=None) -> torch.Tensor:
    """The int32 ``(N, K)`` table of target positions (``-1``: no pair) that every face reads; cached per
    arguments and device. See :func:`foresight_cosine_loss` for the rule."""
    grid = _reference.normalize_grid(grid)
    return _pairing_table(seqlen, grid, parse_offsets(offsets, grid), prefix, boundary, align_prefix, device)


def _pairing_table(seqlen, grid, parsed, prefix, boundary, align_prefix, device):
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (seqlen, grid, prefix, parsed, boundary, bool(align_prefix), str(device))
    table = _TPOS_CACHE.get(key)
    if table is None:
        table = _reference.pairing_table(seqlen, grid, prefix, parsed, boundary, align_prefix, device=device)
        _TPOS_CACHE[key] = table
    return table


def _pair_counts(seqlen, grid, parsed, prefix, boundary, align_prefix) -> list[int]:
    """Valid pairs per head per sample, as host ints (no device read)."""
    key = ("counts", seqlen, grid, prefix, parsed, boundary, bool(align_prefix))
    counts = _TPOS_CACHE.get(key)
    if counts is None:
        # From the plain-Python table: constants, also while torch.compile traces this.
        rows = _reference._pairing_list(seqlen, grid, prefix, parsed, boundary, bool(align_prefix))
        counts = [sum(1 for row in rows if row[k] >= 0) for k in range(len(parsed))]
        _TPOS_CACHE[key] = counts
    return counts


def grid_to_sequence(features: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Turn an encoder's patch-indexed features into sequence-indexed foresight targets.

    Arguments:
        features: ``(B, H*W, Z)``, any float dtype: feature ``j`` belongs to grid cell ``j`` (raster order).
        prefix: number of prefix positions of the sequence (class token; LlamaGen: 1).
    Return:
        ``(B, prefix + H*W - 1, Z)``: position ``prefix + j`` holds cell ``j`` (the state that consumed cell ``j``
        is paired with it), the last cell is dropped (no position consumes it), the prefix rows are zeros — use
        ``align_prefix=False`` (Mirai-I) so they are never paired.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError(f"grid_to_sequence: features must be (B, H*W, Z), got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"grid_to_sequence: prefix must be an int >= 0, got {prefix!r}")
    if features.shape[1] < 1:
        raise ValueError("grid_to_sequence: features have no grid cell")
    return _reference.grid_to_sequence(features, prefix)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _describe(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_pairing(where, seqlen, n_heads, grid, offsets, prefix, boundary, head_weights):
    if grid is None:
        raise ValueError(f"{where}: grid=(H, W) is required (the token grid in raster order)")
    try:
        grid = _reference.normalize_grid(grid)
        parsed = parse_offsets(offsets, grid)
        _reference.check_pairing_args(seqlen, grid, prefix, boundary)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if len(parsed) != n_heads:
        raise ValueError(f"{where}: {len(parsed)} offsets for {n_heads} foresight heads (dim 2 of the input)")
    for o, dy, dx in parsed:
        if seqlen and o >= seqlen:  # an empty sequence (N = 0) has no pair at any offset: loss 0
            raise ValueError(f"{where}: offset {o} ((dy, dx) = ({dy}, {dx})) must be < N = {seqlen}")
    if head_weights is not None:
        n_w = len(head_weights) if not isinstance(head_weights, torch.Tensor) else head_weights.numel()
        if n_w != n_heads:
            raise ValueError(f"{where}: head_weights has {n_w} entries for {n_heads} foresight heads")
    return grid, parsed


def _check_float(where, name, t, device=None, dtype=None):
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{where}: {name} dtype {t.dtype} differs from {dtype} (cast it; e.g. the fp32 teacher state "
                        f"to the student's dtype)")
    if device is not None and t.device != device:
        raise ValueError(f"{where}: {name} is on {t.device}, expected {device}")
    if t.numel() > 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{where}: {name} must have a unit stride in its last dim, got strides {t.stride()}")


def _weights_total(per_head: torch.Tensor, head_weights) -> torch.Tensor:
    if head_weights is None:
        return per_head.sum()
    w = torch.as_tensor(head_weights, dtype=per_head.dtype, device=per_head.device)
    return (w * per_head).sum()


def foresight_cosine_loss(proj: torch.Tensor, targets: torch.Tensor, offsets, *, grid, prefix: int = 1,
                          boundary: str = "raster", align_prefix: bool = True,
                          head_weights: Optional[Sequence[float]] = None, backend: Optional[str] = None):
    """Mirai's multi-offset foresight loss on precomputed head projections.

    Arguments:
        proj: ``(B, N, K, Z)``, float16 / bfloat16 / float32 (float64: reference and C++ faces), unit last-dim
            stride: foresight head ``k``'s projection of the student state at sequence position ``p``.
        targets: ``(B, N, Z)``, ``proj``'s dtype and device, unit last-dim stride, indexed **like the sequence**:
            position ``p`` holds the target feature of the state at ``p`` (LlamaGen training: ``N = prefix + H*W -
            1``, position ``prefix + j`` is grid cell ``j``; see :func:`grid_to_sequence`). Gets no gradient.
        offsets: ``K`` offsets, each a raster int ``o >= 0`` or a ``(dy, dx)`` pair with ``dy >= 0``,
            ``0 <= dx < W`` (raster ``dy*W + dx``); every raster offset must be ``< N``. Paper (Mirai-E):
            ``[0, 1, 16]`` on 16x16; its nine: ``0, 1, 16, 17, 2, 18, 34, 33, 32``.
        grid: ``(H, W)`` (an int: square), required; ``N <= prefix + H*W``.
        prefix: prefix positions (class token; LlamaGen 1).
        boundary: ``"raster"`` (paper-exact flat offset: "right" of the last column pairs with the next row's first
            cell) or ``"grid"`` (drops pairs whose column ``(p - prefix) % W + dx`` leaves the row).
        align_prefix: prefix positions pair with themselves in every head (paper code); ``False`` drops them
            (Mirai-I).
        head_weights: ``K`` weights λ (default 1 each).
        backend: ``None`` / ``"auto"`` / ``"reference"`` / ``"triton"`` / ``"cpp"``.
    Pairing: student position ``p >= prefix`` pairs with target ``p + o_k`` when ``p + o_k < N`` (and, for
    ``"grid"``, the column stays in the row); pairs past the end are dropped.
    Return:
        ``(total, per_head)``: ``per_head`` ``(K,)`` fp32 (fp64 for fp64), ``per_head[k] = -mean`` over (batch,
        valid pairs of head k) of ``cos(proj, targets)`` (0 for a head with no pair); ``total = sum_k λ_k
        per_head[k]``. ``cos(s, t) = <s, t> / (max(|s|, 1e-4) max(|t|, 1e-4))``: a zero vector has cosine 0 and
        finite gradient. An empty input (``B = 0``, ``N = 0`` or ``Z = 0``) has no pair: ``total = per_head = 0`` and
        every gradient is an exact zero, on every face.
    """
    where = "foresight_cosine_loss"
    if not isinstance(proj, torch.Tensor) or proj.dim() != 4:
        raise ValueError(f"{where}: proj must be (B, N, K, Z), got {_describe(proj)}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 3:
        raise ValueError(f"{where}: targets must be (B, N, Z), got {_describe(targets)}")
    batch, seqlen, n_heads, z_dim = proj.shape
    if tuple(targets.shape) != (batch, seqlen, z_dim):
        raise ValueError(f"{where}: targets {tuple(targets.shape)} must be (B, N, Z) = {(batch, seqlen, z_dim)} "
                         f"to match proj {tuple(proj.shape)}")
    _check_float(where, "proj", proj)
    _check_float(where, "targets", targets, proj.device, proj.dtype)
    grid, parsed = _check_pairing(where, seqlen, n_heads, grid, offsets, prefix, boundary, head_weights)
    face = _backend.select_face(OP, proj.device, backend)
    _checks.check_face_dtype(where, face, proj.dtype)
    face = _checks.face_for(face, proj, targets)  # empty: loss 0 (a mean over no pair), gradients exact zeros
    tpos = _pairing_table(seqlen, grid, parsed, prefix, boundary, align_prefix, proj.device)
    if face == "reference":
        cos = _reference.pairwise_cosine(proj, targets, tpos)
    else:
        cos = getattr(torch.ops.mirai, f"foresight_cos_fwd_{face}")(proj, targets.detach(), tpos)
    counts = ((tpos >= 0).sum(0) * batch).clamp(min=1).to(cos.dtype)
    per_head = -cos.sum(dim=(0, 1)) / counts
    return _weights_total(per_head, head_weights), per_head


def fused_linear_cosine_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, offsets, *, grid, prefix: int = 1, boundary: str = "raster",
                             align_prefix: bool = True, head_weights: Optional[Sequence[float]] = None,
                             input_activation: Optional[str] = None, backend: Optional[str] = None):
    """The foresight heads' last ``Linear(hidden -> Z)`` fused with :func:`foresight_cosine_loss`: the ``(B, N,
    K, Z)`` projections are never stored.

    Arguments:
        x: ``(B, N, K, hidden)``, float16 / bfloat16 / float32 (float64: reference and C++ faces), unit last-dim
            stride, any other strides (a permuted ``(K, B, N, hidden)`` buffer is fine): head ``k``'s last hidden
            activation at position ``p``.
        weight: ``(K, Z, hidden)``, ``x``'s dtype and device (head ``k``'s ``nn.Linear.weight``).
        bias: ``(K, Z)`` or ``None``, ``x``'s dtype.
        targets, offsets, grid, prefix, boundary, align_prefix, head_weights, backend: as
            :func:`foresight_cosine_loss` (``proj[b, p, k] = weight[k] @ act(x[b, p, k]) + bias[k]``).
        input_activation: ``None`` (act = identity) or ``"silu"``: ``x`` is then the pre-activation of the
            heads' last SiLU, applied chunk by chunk inside the op, so neither the activation nor ``x`` itself is
            kept for backward (only the input gradient, computed in the forward pass).
    Return:
        ``(total, per_head)`` as :func:`foresight_cosine_loss`; differentiable w.r.t. ``x``, ``weight``, ``bias``
        (computed in the forward pass when grad is enabled and one of them requires grad; the fast faces raise on
        double backward, the reference supports it). Empty inputs: as :func:`foresight_cosine_loss` (loss 0, zero
        gradients).
    """
    where = "fused_linear_cosine_loss"
    if input_activation not in (None, "silu"):
        raise ValueError(f"{where}: input_activation must be None or 'silu', got {input_activation!r}")
    silu = input_activation == "silu"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be (B, N, K, hidden), got {_describe(x)}")
    batch, seqlen, n_heads, hidden = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[0] != n_heads \
            or weight.shape[2] != hidden:
        raise ValueError(f"{where}: weight must be (K, Z, hidden) = ({n_heads}, Z, {hidden}), got {_describe(weight)}")
    z_dim = weight.shape[1]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_heads, z_dim)):
        raise ValueError(f"{where}: bias must be (K, Z) = ({n_heads}, {z_dim}) or None, got {_describe(bias)}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (batch, seqlen, z_dim):
        raise ValueError(f"{where}: targets must be (B, N, Z) = ({batch}, {seqlen}, {z_dim}), got "
                         f"{_describe(targets)}")
    _check_float(where, "x", x)
    _check_float(where, "weight", weight, x.device, x.dtype)
    if bias is not None:
        _check_float(where, "bias", bias, x.device, x.dtype)
    _check_float(where, "targets", targets, x.device, x.dtype)
    grid, parsed = _check_pairing(where, seqlen, n_heads, grid, offsets, prefix, boundary, head_weights)
    face = _backend.select_face(FUSED_OP, x.device, backend)
    _checks.check_face_dtype(where, face, x.dtype)
    face = _checks.face_for(face, x, weight, targets)  # empty: loss 0 (a mean over no pair), exact zero grads
    tpos = _pairing_table(seqlen, grid, parsed, prefix, boundary, align_prefix, x.device)
    if face == "reference":
        acc = _acc_dtype(x.dtype)
        xa = torch.nn.functional.silu(x.to(acc)) if silu else x.to(acc)
        proj = torch.einsum("bnkh,kzh->bnkz", xa, weight.to(acc))
        if bias is not None:
            proj = proj + bias.to(acc)
        cos = _reference.pairwise_cosine(proj, targets, tpos)
        counts = ((tpos >= 0).sum(0) * batch).clamp(min=1).to(cos.dtype)
        per_head = -cos.sum(dim=(0, 1)) / counts
    else:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        op = getattr(torch.ops.mirai, f"fused_linear_cos_{face}")
        counts = _pair_counts(seqlen, grid, parsed, prefix, boundary, align_prefix)
        if head_weights is None or isinstance(head_weights, torch.Tensor):
            expected = [1.0] * n_heads
        else:
            expected = [float(w) if float(w) != 0.0 else 1.0 for w in head_weights]
        grad_scale = [e / max(1, batch * c) for e, c in zip(expected, counts)]
        per_head = op(x, weight, bias, targets.detach(), tpos, needs_grad, silu, CHUNK_ROWS, grad_scale)[0]
    return _weights_total(per_head, head_weights), per_head
