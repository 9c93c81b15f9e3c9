"""Input checks every door shares, so that one class of bad input is refused the same way by every op and backend.

Each door (``ops/<op>.py``) calls these instead of restating them:

* :func:`describe`, :func:`check_rank`, :func:`check_float`, :func:`check_device`, :func:`check_unit_stride` —
  the argument checks of every door, one wording each (``got (2, 3)``, ``x is on meta but q is on cpu``);
* :func:`check_rope_table` — the RoPE table as :func:`mirai_kernels.rope_2d_table` builds it (rope and decode);
* :func:`check_softmax_scale` — a finite real number (or None for the default); NaN/Inf scales used to turn every
  row of decode attention into garbage without a word;
* :func:`check_writable` — a tensor an op writes in place must not alias itself (``expand``ed, stride-0 caches:
  the fast backends would write several logical rows to one memory row and attend to the last writer);
* :func:`check_face_dtype` — what a backend cannot compute: fp64 on the fp32 backends, and bf16 on interpreted Triton
  (the CPU interpreter emulates bf16 loads wrongly: outputs off by ~1e9 relative; bf16 Triton is tested on GPUs);
* :func:`face_for` — the empty-input rule: a call with an empty input runs on the reference backend (exact, no
  kernel launch), so empty in gives empty or zero outputs and exact zero gradients on every backend;
* :func:`check_distinct` — two tensors written in place must not be the same memory.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import backend as _backend


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(t) -> str:
    """What an error message prints after "got": a tensor's shape ``(2, 3)``, or the type name of anything else."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_rank(where: str, name: str, t, layout: str) -> None:
    """``t`` must be a tensor with one dim per name in ``layout``, e.g. ``"(batch, seqlen, nheads, head_dim)"``."""
    dim = layout.count(",") + 1
    if not isinstance(t, torch.Tensor) or t.dim() != dim:
        raise ValueError(f"{where}: {name} must be {layout} (a {dim}-D tensor), got {describe(t)}")


def check_float(where: str, name: str, t: torch.Tensor) -> None:
    """``t`` must have a float dtype the backends compute (which backend takes which is :func:`check_face_dtype`)."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be float16, bfloat16, float32 or float64 (its dtype must be floating "
                        f"point), got {t.dtype}")


def check_device(where: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{where}: {name} is on {t.device} but {ref_name} is on {ref.device} (the inputs must be on "
                         "one device)")


def check_unit_stride(where: str, name: str, t: torch.Tensor) -> None:
    """The kernels read the last dim as one contiguous vector; every other stride is free (q, k, v may be views of a
    fused qkv projection). A tensor with at most one element is read by no vector load: any stride then."""
    if t.dim() and t.shape[-1] > 1 and t.numel() > 1 and t.stride(-1) != 1:
        raise ValueError(f"{where}: {name} must have a unit stride in its last dim (got strides {t.stride()}); "
                         "strided views (e.g. of a fused qkv) are fine, a transposed last dim is not")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its last dim is strided: autograd can hand expanded (``.sum()``) or
    transposed gradients to a backward whose kernels need a unit last-dim stride."""
    return t if t.size(-1) <= 1 or t.stride(-1) == 1 else t.contiguous()


def check_rope_table(where: str, name: str, table, head_dim: int, x_name: str, x: torch.Tensor) -> None:
    """A RoPE table for ``head_dim`` as :func:`mirai_kernels.rope_2d_table` builds it, on ``x``'s device."""
    if head_dim % 2 or not isinstance(table, torch.Tensor) or table.dim() != 3 or table.shape[1:] != (
            head_dim // 2, 2):
        raise ValueError(f"{where}: {name} must be (rows, head_dim/2 = {head_dim // 2}, 2) as built by "
                         f"rope_2d_table, got {describe(table)}")
    if table.dtype != torch.float32:
        raise TypeError(f"{where}: {name} must be float32, got {table.dtype}")
    if not table.is_contiguous():
        raise ValueError(f"{where}: {name} must be contiguous")
    check_device(where, name, table, x_name, x)


def check_softmax_scale(where: str, softmax_scale) -> float | None:
    """``softmax_scale`` must be None or a finite real number (Python or NumPy; bools are refused: ``True`` is not
    a scale, and a tensor would need a device read)."""
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or not math.isfinite(
            softmax_scale):
        raise ValueError(f"{where}: softmax_scale must be a finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _self_overlapping(t: torch.Tensor) -> bool:
    """True when two in-bounds indices of ``t`` may address the same element: a stride 0 on a dim of size > 1, or
    strides that interleave (dims sorted by stride, each stride must reach past the span of the smaller ones; a few
    exotic non-overlapping layouts are refused too). Sizes and strides only: no device read."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    reach = 1  # every index below ``reach`` elements apart is distinct so far
    for stride, size in dims:
        if stride < reach:
            return True
        reach = stride * size
    return False


def check_writable(where: str, name: str, t: torch.Tensor) -> None:
    """Refuse a tensor the op writes in place when its elements alias each other (``expand``, ``as_strided``)."""
    if t.numel() > 1 and _self_overlapping(t):
        raise ValueError(f"{where}: {name} is written in place but its elements overlap in memory (strides "
                         f"{t.stride()} for shape {tuple(t.shape)}, e.g. an expand()ed tensor): several rows would "
                         "be written to one memory row; pass a tensor with its own storage per row (.contiguous())")


def check_face_dtype(where: str, face: str, dtype: torch.dtype, fp64_faces=("reference", "cpp")) -> None:
    """Refuse a dtype backend ``face`` cannot compute correctly, with the reason and the alternative.
    ``fp64_faces``: the op's backends that take float64 (declared with the op, :mod:`mirai_kernels.ops._registry`)."""
    if dtype == torch.float64 and face not in fp64_faces:
        raise TypeError(f"{where}: backend={face!r} computes in fp32 and does not take float64 inputs (use "
                        f"backend={fp64_faces[0]!r})")
    if face == "triton" and dtype == torch.bfloat16 and _backend.triton_interpreted():
        raise TypeError(f"{where}: bfloat16 on the interpreted Triton face (TRITON_INTERPRET=1) is refused: the CPU "
                        "interpreter computes bf16 wrongly. bf16 Triton runs on a GPU; on CPU use float16/float32, "
                        "or backend='cpp' / 'reference' for bf16")


def is_empty(*tensors: torch.Tensor) -> bool:
    """True when some input has no element, i.e. the op has no work (outputs and gradients are zeros)."""
    return any(t is not None and t.numel() == 0 for t in tensors)


def face_for(face: str, *tensors: torch.Tensor) -> str:
    """The backend that runs a call: ``face``, or the reference when an input is empty. Zero-sized launches, grids and
    GEMMs are where kernels return uninitialised buffers (a weight gradient of ``torch.empty``, an LSE of rows with
    ``head_dim = 0``); the reference's plain PyTorch is exact there and cheap (there is no work)."""
    return "reference" if is_empty(*tensors) else face


def check_distinct(where: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two tensors an op writes must not start at the same memory (``k_cache`` passed as ``v_cache`` too)."""
    # torch.compile cannot trace data pointers: there, the same tensor object passed twice is what is caught.
    same = (a is b) if torch.compiler.is_compiling() else (a.numel() and b.numel() and a.data_ptr() == b.data_ptr())
    if same:
        raise ValueError(f"{where}: {name_a} and {name_b} are the same memory; both are written in place, so they "
                         "must be separate tensors")
