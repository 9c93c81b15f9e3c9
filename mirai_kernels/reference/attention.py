"""Masked softmax attention with the non-finite rule every attention op follows (decode and dual attention).

The rule (README, "Guarantees"):

* an output row is a function of its query row and of the key/value rows **visible** to it only: whatever a
  masked-out key or value holds (NaN, Inf, an uninitialised cache row) never reaches it;
* over the visible keys the maths is plain attention, ``softmax(scale * q k^T) @ v`` in the compute dtype, so
  non-finite inputs propagate exactly as in PyTorch's SDPA (math backend): a NaN in the query or in a visible key
  makes the row NaN, a NaN (or Inf) in a visible value reaches that dimension of the output, a ``+inf`` score makes
  the row NaN;
* a row with nothing to attend — no visible key, or every visible score ``-inf`` — outputs zeros (as SDPA and
  FlashAttention) and has log-sum-exp ``-inf``.

A plain ``probs @ v`` breaks the first point (``0 * NaN = NaN``), so the products of visible probabilities with
non-finite values are accounted for separately (:func:`visible_matmul`). That costs four more matmuls, paid only
when a value is non-finite, which only a CPU tensor can tell for free: on other devices (the reference as the GPU
fallback, where a host sync would also break CUDA-graph capture) the plain product is used, so there a non-finite
value in a row's masked-out future reaches it as in SDPA. Rows masked out for *every* query (a decode cache past
its length) are cut before the product on every device.
"""

from __future__ import annotations

import torch


def visible_matmul(probs: torch.Tensor, visible: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_j probs[..., i, j] * v[..., j, :]`` over the visible ``j`` only (``visible`` broadcasts against
    ``probs``; ``probs`` must be 0 where not visible). Exact IEEE semantics of that sum for non-finite values."""
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    # Keys no query sees (a cache past its length) are cut here, on every device, for one elementwise pass.
    seen = visible.any(dim=-2, keepdim=True).transpose(-1, -2)  # (..., S_k, 1)
    v = torch.where(seen, v, zero)
    if v.device.type != "cpu":
        return probs @ v  # see the module docstring: no host sync, no extra matmuls off the CPU
    finite = torch.isfinite(v)
    out = probs @ torch.where(finite, v, zero)
    # Fast path in eager mode: all values finite (the usual case) needs nothing more. Traced code always takes the
    # general path (no data-dependent branch).
    if not torch.compiler.is_compiling() and bool(finite.all()):
        return out
    vis = visible.expand(probs.shape).to(probs.dtype)
    positive = (probs.detach() > 0) & visible  # visible keys with a non-zero weight: p * inf = inf
    zero_vis = visible & (probs.detach() == 0)  # visible keys whose weight underflowed: 0 * inf = NaN
    f = probs.dtype
    n_nan = vis @ v.isnan().to(f)
    n_inf_at_zero = zero_vis.to(f) @ v.isinf().to(f)
    n_pinf = positive.to(f) @ (v == float("inf")).to(f)
    n_ninf = positive.to(f) @ (v == float("-inf")).to(f)
    inf = torch.full((), float("inf"), dtype=out.dtype, device=out.device)
    res = torch.where(n_pinf > 0, inf, out)
    res = torch.where(n_ninf > 0, -inf, res)
    nan_rows = out.isnan() | (n_nan > 0) | (n_inf_at_zero > 0) | ((n_pinf > 0) & (n_ninf > 0))
    return torch.where(nan_rows, torch.full((), float("nan"), dtype=out.dtype, device=out.device), res)


def masked_attention(scores: torch.Tensor, visible: torch.Tensor, v: torch.Tensor):
    """``(out, lse)`` of softmax attention with the rule above. ``scores`` ``(..., S_q, S_k)`` in the compute dtype
    (already scaled), ``visible`` bool broadcastable to it, ``v`` ``(..., S_k, D)``; ``lse`` ``(..., S_q)``."""
    masked = scores.masked_fill(~visible, float("-inf"))  # a masked NaN score is gone here
    lse = torch.logsumexp(masked, dim=-1)
    nothing = lse == float("-inf")  # no visible key, or all visible scores -inf
    # exp(s - lse): the softmax, 0 at masked keys; the rows with nothing to attend get a shift of 0 so that they
    # are exactly 0 instead of exp(-inf + inf) = NaN.
    probs = torch.exp(masked - torch.where(nothing, torch.zeros_like(lse), lse)[..., None])
    return visible_matmul(probs, visible, v), lse
