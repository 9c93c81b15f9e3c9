"""The door of dual (causal + bidirectional) attention: its declaration, input checks, and :func:`dual_attention`.

Declared stages (:mod:`mirai_kernels.ops._registry`: ``mirai::dual_attention_<stage>`` for the ``cpp`` backend,
csrc/dual_attention.cpp, and ``mirai::dual_attention_<stage>_triton``; CUDA, or CPU under the interpreter):

* ``fwd(q, k, v, softmax_scale, causal, bidirectional, bidirectional_grad)
  -> (out_causal, out_bidir, lse_causal, lse_bidir)``: an output not requested comes back as an empty tensor
  (shape ``(0,)``) and is not computed. ``bidirectional_grad`` does not change the forward; it tells the autograd
  formula whether the bidirectional output's gradient flows (decided here, at forward time, because autograd hands
  zeros rather than None for outputs the loss ignores).
* ``bwd(q, k, v, out_c?, out_b?, lse_c?, lse_b?, dout_c?, dout_b?, softmax_scale) -> (dq, dk, dv)``: a None
  upstream gradient skips its share of the work (a None ``dout_b`` skips every key tile above the diagonal).

The ``reference`` backend is plain PyTorch (autograd by PyTorch). The LSEs are never differentiable.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..reference import dual_attention as _reference
from . import _checks, _registry

OUTPUTS = ("both", "causal", "bidirectional")


def _triton_fwd(q, k, v, softmax_scale, causal, bidirectional, bidirectional_grad):
    from ..triton import dual_attention as kernels  # lazy: Triton is optional and reads TRITON_INTERPRET

    return kernels.dual_attention_fwd(q, k, v, softmax_scale, causal, bidirectional)


def _triton_bwd(q, k, v, out_c, out_b, lse_c, lse_b, dout_c, dout_b, softmax_scale):
    from ..triton import dual_attention as kernels

    return kernels.dual_attention_bwd(q, k, v, out_c, out_b, lse_c, lse_b, dout_c, dout_b, softmax_scale)


def _fake_fwd(q, k, v, softmax_scale, causal, bidirectional, bidirectional_grad):
    batch, seqlen, nheads, _ = q.shape
    out = lambda want: q.new_empty(q.shape) if want else q.new_empty(0)  # noqa: E731
    lse = lambda want: q.new_empty((batch, nheads, seqlen), dtype=torch.float32) if want else q.new_empty(  # noqa: E731
        0, dtype=torch.float32)
    return out(causal), out(bidirectional), lse(causal), lse(bidirectional)


def _fake_bwd(q, k, v, out_c, out_b, lse_c, lse_b, dout_c, dout_b, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _reference_vjp(q, k, v, softmax_scale, dout_c, dout_b):
    """``(dq, dk, dv)`` for upstream ``dout_c``/``dout_b`` (None: not flowing) from the reference maths, as a
    differentiable graph (used by the fast faces' backward under ``create_graph=True``)."""
    outputs = "both" if dout_c is not None and dout_b is not None else ("causal" if dout_c is not None else
                                                                         "bidirectional")
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in (q, k, v)]
        out_c, out_b, _, _ = _reference.dual_attention(*leaves, softmax_scale, outputs)
        outs, grads = zip(*[(o, g) for o, g in ((out_c, dout_c), (out_b, dout_b)) if g is not None])
        return torch.autograd.grad(outs, leaves, grads, create_graph=True, allow_unused=True)


def _autograd(ops):
    bwd_op = ops["bwd"]

    def setup_context(ctx, inputs, output):
        q, k, v, softmax_scale, causal, bidirectional, bidirectional_grad = inputs
        out_c, out_b, lse_c, lse_b = output
        ctx.mark_non_differentiable(lse_c, lse_b)
        ctx.has_c, ctx.has_b = causal, bidirectional and bidirectional_grad
        ctx.softmax_scale = softmax_scale
        ctx.save_for_backward(q, k, v, out_c, out_b, lse_c, lse_b)

    def backward(ctx, grad_c, grad_b, _grad_lse_c, _grad_lse_b):
        q, k, v, out_c, out_b, lse_c, lse_b = ctx.saved_tensors
        dout_c = _checks.unit_last_stride(grad_c) if ctx.has_c and grad_c is not None else None
        dout_b = _checks.unit_last_stride(grad_b) if ctx.has_b and grad_b is not None else None
        if dout_c is None and dout_b is None:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the bwd kernels have no derivative of their own, so this
            # backward is the reference's, differentiated by autograd, instead of silently zero second-order terms.
            return (*_reference_vjp(q, k, v, ctx.softmax_scale, dout_c, dout_b), None, None, None, None)
        dq, dk, dv = bwd_op(q, k, v, out_c if dout_c is not None else None, out_b if dout_b is not None else None,
                            lse_c if dout_c is not None else None, lse_b if dout_b is not None else None,
                            dout_c, dout_b, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None

    return backward, setup_context


OP = _registry.declare(
    "dual_attention",
    faces=("reference", "triton", "cpp"),
    fp64_faces=("reference",),
    stages={
        "fwd": _registry.Stage(
            "(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, bool bidirectional, "
            "bool bidirectional_grad) -> (Tensor, Tensor, Tensor, Tensor)",
            triton=_triton_fwd, fake=_fake_fwd, autograd=_autograd),
        "bwd": _registry.Stage(
            "(Tensor q, Tensor k, Tensor v, Tensor? out_c, Tensor? out_b, Tensor? lse_c, Tensor? lse_b, "
            "Tensor? dout_c, Tensor? dout_b, float softmax_scale) -> (Tensor, Tensor, Tensor)",
            triton=_triton_bwd, fake=_fake_bwd),
    },
)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, softmax_scale, outputs) -> None:
    where = "dual_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(where, name, t, "(batch, seqlen, nheads, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, seqlen and "
                         "head_dim (layout (batch, seqlen, nheads, head_dim))")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{where}: nheads_k = {k.shape[2]} must divide nheads = {q.shape[2]} (grouped K/V)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _checks.check_float(where, "q", q)
    for name, t in (("k", k), ("v", v)):
        _checks.check_device(where, name, t, "q", q)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_unit_stride(where, name, t)
    if outputs not in OUTPUTS:
        raise ValueError(f"{where}: outputs must be one of {OUTPUTS}, got {outputs!r}")
    _checks.check_softmax_scale(where, softmax_scale)


def dual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: Optional[float] = None,
                   outputs: str = "both", return_lse: bool = False, bidirectional_grad: bool = True,
                   backend: Optional[str] = None):
    """Causal and bidirectional attention over the same q, k, v from one pass over the keys.

    Row ``i`` of the causal output attends to keys ``j <= i``, row ``i`` of the bidirectional output to all keys.
    The fast backends compute both for the price of one full attention (and one full backward); see
    docs/method.md, "The shared bidirectional pass".

    Arguments:
        q: ``(batch, seqlen, nheads, head_dim)``, float16 / bfloat16 / float32 (float64: reference backend only).
        k, v: ``(batch, seqlen, nheads_k, head_dim)``, q's dtype and device; ``nheads_k`` divides ``nheads`` (query
            head ``h`` reads K/V head ``h // (nheads // nheads_k)``). q, k, v may be any strided views with a unit
            last-dim stride (typically slices of one fused qkv projection).
        softmax_scale: scale of ``q . k`` before the softmax; default ``1 / sqrt(head_dim)``.
        outputs: ``"both"``, ``"causal"`` or ``"bidirectional"``. An output not requested is not computed in the
            forward nor in the backward.
        return_lse: also return the log-sum-exp of each row's scaled scores.
        bidirectional_grad: when False the bidirectional output is returned detached (a stop-gradient target)
            and the backward skips its key tiles entirely.
        backend: ``None`` (current default, see :mod:`mirai_kernels.backend`), ``"auto"``, ``"reference"``,
            ``"triton"`` or ``"cpp"``.
    Return:
        ``(out_causal, out_bidir)``, or with ``return_lse=True`` ``(out_causal, out_bidir, lse_causal, lse_bidir)``;
        None for an output not requested. Outputs are ``(batch, seqlen, nheads, head_dim)`` contiguous in q's dtype
        (fp32 accumulation); LSEs are ``(batch, nheads, seqlen)`` float32 (float64 for float64 inputs) and carry no
        gradient. Both outputs are differentiable w.r.t. q, k, v with independent upstream gradients; double
        backward (``create_graph=True``) works on every backend (the fast backends' backward then runs the
        reference's maths).

    Non-finite inputs follow plain attention (SDPA): NaN in q or a visible key makes the row NaN, NaN/Inf in a
    visible value reaches that output dimension, a future key/value never reaches a causal row, a row whose visible
    scores are all ``-inf`` is zeros with LSE ``-inf`` (the Triton backend does not yet follow these last two: a
    known gap in the README). ``softmax_scale`` must be finite. Empty inputs give empty outputs and zero gradients.
    """
    _check_inputs(q, k, v, softmax_scale, outputs)
    scale = 1.0 / math.sqrt(max(1, q.shape[-1])) if softmax_scale is None else float(softmax_scale)
    face = OP.select(q.device, backend, q.dtype, q, k, v)  # empty: empty outputs, zero gradients, exact LSEs
    if face == "reference":
        out_c, out_b, lse_c, lse_b = _reference.dual_attention(q, k, v, scale, outputs)
        if lse_c is not None:
            lse_c = lse_c.detach()
        if lse_b is not None:
            lse_b = lse_b.detach()
    else:
        want_c, want_b = outputs != "bidirectional", outputs != "causal"
        out_c, out_b, lse_c, lse_b = OP.op(face, "fwd")(q, k, v, scale, want_c, want_b, bidirectional_grad)
        if not want_c:
            out_c = lse_c = None
        if not want_b:
            out_b = lse_b = None
    if out_b is not None and not bidirectional_grad:
        out_b = out_b.detach()
    if return_lse:
        return out_c, out_b, lse_c, lse_b
    return out_c, out_b
