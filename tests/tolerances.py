"""Tolerance helpers shared by the op tests.

Two rules:

* :func:`assert_close_fa` — FlashAttention's rule: a fast face's error against a higher-precision reference may be
  at most ``factor`` (2 for outputs, 3 for gradients) times the error that plain PyTorch makes at the face's own
  precision, plus a small absolute floor (an fp32 PyTorch baseline against an fp32-rounded reference can have zero
  error, and then any rounding difference would fail).
* :data:`ATOL` / :data:`RTOL` — explicit per-dtype tolerances, for ops without a natural "plain PyTorch" baseline.
"""

import torch

# Absolute error floors of the FlashAttention rule, per dtype of the face under test.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# Explicit tolerances for elementwise-like ops (one rounding of an O(1) value plus fp32 math).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_fa(out, out_ref, out_pt, *, factor: float = 2.0, floor: float | None = None, name: str = "output"):
    """``out`` (the face) vs ``out_ref`` (high precision) must be within ``factor`` x the error of ``out_pt``
    (plain PyTorch at the face's precision) vs ``out_ref``, plus ``floor`` (default: :data:`FLOOR` of out's dtype)."""
    assert out.shape == out_ref.shape == out_pt.shape, (name, out.shape, out_ref.shape, out_pt.shape)
    floor = FLOOR[out.dtype] if floor is None else floor
    err, err_pt = max_abs_err(out, out_ref), max_abs_err(out_pt, out_ref)
    assert err <= factor * err_pt + floor, (
        f"{name}: max error {err:.3e} > {factor} x PyTorch's {err_pt:.3e} + floor {floor:.1e}"
    )


def assert_close_dtype(out, expected, *, name: str = "output"):
    """Elementwise ``|out - expected| <= ATOL + RTOL * |expected|`` with the tolerances of ``out``'s dtype."""
    torch.testing.assert_close(
        out.double(), expected.double(), atol=ATOL[out.dtype], rtol=RTOL[out.dtype], msg=lambda m: f"{name}: {m}"
    )
