"""The door of the foresight loss ops: their declarations, input checks, and the public functions
``foresight_cosine_loss``, ``fused_linear_cosine_loss`` and ``grid_to_sequence``. The pairing table is built and
kept by :mod:`mirai_kernels.ops._pairing`, the Triton backend's fused driver lives in
:mod:`mirai_kernels.triton.foresight`, the maths in :mod:`mirai_kernels.reference.foresight`.

Declared ops (:mod:`mirai_kernels.ops._registry`; backend ``cpp``: csrc/foresight.cpp, ``triton``: the ``_triton``
ops):

* ``foresight_cosine_loss``: ``mirai::foresight_cosine_loss_fwd(proj, targets, tpos) -> cos (B, N, K)`` and
  ``mirai::foresight_cosine_loss_bwd(grad_cos, proj, targets, tpos) -> grad_proj``. ``tpos`` is the int32 ``(N, K)``
  pairing table (target position per student position and foresight head, -1 for none), so no shifted,
  concatenated or normalised copy of anything is made; the per-head means are a ``(B, N, K) -> (K,)`` sum in
  PyTorch. The forward op is differentiable (autograd formula = the bwd op), with no gradient to the targets.
* ``fused_linear_cosine_loss``: ``mirai::fused_linear_cosine_loss(x, weight, bias, targets, tpos, compute_grad,
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
* ``foresight_heads`` (backend ``cpp`` only, csrc/foresight_heads.cpp): ``mirai::foresight_heads(h, targets, tpos,
  weights, biases, grad_mask, grad_scale) -> (per_head, grad_h, grad_weights, grad_biases)``, the whole
  K-head MLP + the fused last layer with every gradient computed in the forward pass: the CPU path of
  :class:`mirai_kernels.ForesightHeads` (no public function of its own; the module's autograd formula wraps it).

Autocast: no autocast rule; ``targets`` must have ``proj``'s (``x``'s) dtype (cast the teacher's fp32 state),
cosines are computed in fp32 (fp64 for fp64 inputs), losses are fp32 (fp64).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference import foresight as _reference
from . import _checks, _pairing, _registry
from ._checks import describe as _describe

parse_offsets = _reference.parse_offsets

# Rows (batch * positions) per chunk of the fused op: bounds its live (rows, Z) projection and gradient. Whole
# sequences only (a pair never leaves its sample). GPT-B: 8192 = all 32 x 256 rows of a head in one GEMM.
CHUNK_ROWS = 8192


def _triton_cos_fwd(proj, targets, tpos):
    from ..triton import foresight as kernels  # lazy: Triton is optional and reads TRITON_INTERPRET when it decorates

    return kernels.foresight_cos_fwd(proj, targets, tpos)


def _triton_cos_bwd(grad_cos, proj, targets, tpos):
    from ..triton import foresight as kernels

    return kernels.foresight_cos_bwd(grad_cos, proj, targets, tpos)


def _triton_fused(x, weight, bias, targets, tpos, compute_grad, silu_input, chunk_rows, grad_scale):
    from ..triton import foresight as kernels

    return kernels.fused_linear_cos(x, weight, bias, targets, tpos, compute_grad, silu_input, chunk_rows,
                                    grad_scale)


def _fake_cos_fwd(proj, targets, tpos):
    return proj.new_empty(proj.shape[:3], dtype=_reference.acc_dtype(proj.dtype))


def _fake_cos_bwd(grad_cos, proj, targets, tpos):
    return proj.new_empty(proj.shape)


def _fake_fused(x, weight, bias, targets, tpos, compute_grad, silu_input, chunk_rows, grad_scale):
    acc = _reference.acc_dtype(x.dtype)
    n_heads = x.shape[2]
    per_head = x.new_empty((n_heads,), dtype=acc)
    if compute_grad:
        grad_x = x.new_empty((n_heads, x.shape[0], x.shape[1], x.shape[3])).permute(1, 2, 0, 3)
        return per_head, grad_x, x.new_empty(weight.shape), x.new_empty(weight.shape[:2])
    return per_head, x.new_empty(0), x.new_empty(0), x.new_empty(0)


def _cos_autograd(ops):
    bwd_op = ops["bwd"]

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

    return backward, setup_context


def _eager_cpu(t: torch.Tensor) -> bool:
    """True for a plain CPU tensor outside any tracing (compile, make_fx, fake or functional modes), where
    reading its values is free and changes no graph."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (t.device.type == "cpu" and type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._is_functional_tensor(t))


def _fused_autograd(ops):

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
                "fused_linear_cosine_loss: backward through a call made with compute_grad=False (the gradients are "
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
        # Built on counts' device: a .cpu() here would make every backward wait for the GPU.
        expected = torch.tensor(ctx.grad_scale, dtype=torch.float64, device=counts.device) * counts.double()
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

    return backward, setup_context


_FACES = ("reference", "triton", "cpp")
_FP64_FACES = ("reference", "cpp")

OP = _registry.declare(
    "foresight_cosine_loss",
    faces=_FACES,
    fp64_faces=_FP64_FACES,
    stages={
        "fwd": _registry.Stage("(Tensor proj, Tensor targets, Tensor tpos) -> Tensor",
                               triton=_triton_cos_fwd, fake=_fake_cos_fwd, autograd=_cos_autograd),
        "bwd": _registry.Stage("(Tensor grad_cos, Tensor proj, Tensor targets, Tensor tpos) -> Tensor",
                               triton=_triton_cos_bwd, fake=_fake_cos_bwd),
    },
)

FUSED_OP = _registry.declare(
    "fused_linear_cosine_loss",
    faces=_FACES,
    fp64_faces=_FP64_FACES,
    stages={"": _registry.Stage(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor targets, Tensor tpos, bool compute_grad, bool silu_input, "
        "SymInt chunk_rows, float[] grad_scale) -> (Tensor, Tensor, Tensor, Tensor)",
        triton=_triton_fused, fake=_fake_fused, autograd=_fused_autograd)},
)


def _fake_heads(h, targets, tpos, weights, biases, grad_mask, grad_scale):
    acc = _reference.acc_dtype(h.dtype)
    per_head = h.new_empty((weights[-1].shape[0],), dtype=acc)

    def grad(i, like):
        return h.new_empty(like.shape) if grad_mask[i] else h.new_empty(0)

    return (per_head, grad(0, h), [grad(1 + 2 * i, w) for i, w in enumerate(weights)],
            [grad(2 + 2 * i, b) for i, b in enumerate(biases)])


# The CPU path of ForesightHeads (mirai_kernels/modules.py, _HeadsGradsInForward): the whole K-head MLP + loss with
# every gradient computed in the forward pass, so it has no autograd formula of its own (the module's wraps it).
# Backend cpp only (csrc/foresight_heads.cpp); its reference is the module's autograd path.
HEADS_OP = _registry.declare(
    "foresight_heads",
    faces=("reference", "cpp"),
    fp64_faces=("reference", "cpp"),
    stages={"": _registry.Stage(
        "(Tensor h, Tensor targets, Tensor tpos, Tensor[] weights, Tensor[] biases, int[] grad_mask, "
        "float[] grad_scale) -> (Tensor, Tensor, Tensor[], Tensor[])",
        triton=None, fake=_fake_heads)},
)


# ---------------------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------------------

def pairing_table(seqlen: int, grid, offsets, *, prefix: int = 1, boundary: str = "raster",
                  align_prefix: bool = True, device=None) -> torch.Tensor:
    """The int32 ``(N, K)`` table of target positions (``-1``: no pair) that every backend reads; cached per
    arguments and device (:mod:`mirai_kernels.ops._pairing`). See :func:`foresight_cosine_loss` for the rule."""
    grid = _reference.normalize_grid(grid)
    return _pairing.pairing_table(seqlen, grid, parse_offsets(offsets, grid), prefix, boundary, align_prefix, device)


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


def _check_float(where, name, t, like_name=None, like=None):
    """A float tensor with a unit last-dim stride; with ``like``: also ``like``'s dtype and device."""
    _checks.check_float(where, name, t)
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{where}: {name} dtype {t.dtype} differs from {like.dtype} (cast it; e.g. the fp32 "
                            "teacher state to the student's dtype)")
        _checks.check_device(where, name, t, like_name, like)
    _checks.check_unit_stride(where, name, t)


def foresight_cosine_loss(proj: torch.Tensor, targets: torch.Tensor, offsets, *, grid, prefix: int = 1,
                          boundary: str = "raster", align_prefix: bool = True,
                          head_weights: Optional[Sequence[float]] = None, backend: Optional[str] = None):
    """Mirai's multi-offset foresight loss on precomputed head projections.

    Arguments:
        proj: ``(B, N, K, Z)``, float16 / bfloat16 / float32 (float64: reference and C++ backends), unit last-dim
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
        every gradient is an exact zero, on every backend.
    """
    where = "foresight_cosine_loss"
    _checks.check_rank(where, "proj", proj, "(B, N, K, Z)")
    _checks.check_rank(where, "targets", targets, "(B, N, Z)")
    batch, seqlen, n_heads, z_dim = proj.shape
    if tuple(targets.shape) != (batch, seqlen, z_dim):
        raise ValueError(f"{where}: targets {tuple(targets.shape)} must be (B, N, Z) = {(batch, seqlen, z_dim)} "
                         f"to match proj {tuple(proj.shape)}")
    _check_float(where, "proj", proj)
    _check_float(where, "targets", targets, "proj", proj)
    grid, parsed = _check_pairing(where, seqlen, n_heads, grid, offsets, prefix, boundary, head_weights)
    face = OP.select(proj.device, backend, proj.dtype, proj, targets)  # empty: loss 0 (a mean over no pair)
    tpos = _pairing.pairing_table(seqlen, grid, parsed, prefix, boundary, align_prefix, proj.device)
    if face == "reference":
        cos = _reference.pairwise_cosine(proj, targets, tpos)
    else:
        cos = OP.op(face, "fwd")(proj, targets.detach(), tpos)
    return _reference.reduce_heads(cos, tpos, head_weights)


def fused_linear_cosine_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, offsets, *, grid, prefix: int = 1, boundary: str = "raster",
                             align_prefix: bool = True, head_weights: Optional[Sequence[float]] = None,
                             input_activation: Optional[str] = None, backend: Optional[str] = None):
    """The foresight heads' last ``Linear(hidden -> Z)`` fused with :func:`foresight_cosine_loss`: the ``(B, N,
    K, Z)`` projections are never stored.

    Arguments:
        x: ``(B, N, K, hidden)``, float16 / bfloat16 / float32 (float64: reference and C++ backends), unit last-dim
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
        (computed in the forward pass when grad is enabled and one of them requires grad; the fast backends raise on
        double backward, the reference supports it). Empty inputs: as :func:`foresight_cosine_loss` (loss 0, zero
        gradients).
    """
    where = "fused_linear_cosine_loss"
    if input_activation not in (None, "silu"):
        raise ValueError(f"{where}: input_activation must be None or 'silu', got {input_activation!r}")
    silu = input_activation == "silu"
    _checks.check_rank(where, "x", x, "(B, N, K, hidden)")
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
    _check_float(where, "weight", weight, "x", x)
    if bias is not None:
        _check_float(where, "bias", bias, "x", x)
    _check_float(where, "targets", targets, "x", x)
    grid, parsed = _check_pairing(where, seqlen, n_heads, grid, offsets, prefix, boundary, head_weights)
    face = FUSED_OP.select(x.device, backend, x.dtype, x, weight, targets)  # empty: loss 0, exact zero grads
    tpos = _pairing.pairing_table(seqlen, grid, parsed, prefix, boundary, align_prefix, x.device)
    if face == "reference":
        proj = _reference.linear_projection(x, weight, bias, input_activation)
        return _reference.reduce_heads(_reference.pairwise_cosine(proj, targets, tpos), tpos, head_weights)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    op = FUSED_OP.op(face)
    counts = _pairing.pair_counts(seqlen, grid, parsed, prefix, boundary, align_prefix)
    if head_weights is None or isinstance(head_weights, torch.Tensor):
        expected = [1.0] * n_heads
    else:
        expected = [float(w) if float(w) != 0.0 else 1.0 for w in head_weights]
    grad_scale = [e / max(1, batch * c) for e, c in zip(expected, counts)]
    per_head = op(x, weight, bias, targets.detach(), tpos, needs_grad, silu, CHUNK_ROWS, grad_scale)[0]
    return _reference.weighted_total(per_head, head_weights), per_head
