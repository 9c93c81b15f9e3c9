"""Input checks every door shares, so that one class of bad input is refused the same way by every op and face.

Each door (``ops/<op>.py``) calls these instead of restating them:

* :func:`check_softmax_scale` — a finite real number (or None for the default); NaN/Inf scales used to turn every
  row of decode attention into garbage without a word;
* :func:`check_writable` — a tensor an op writes in place must not alias itself (``expand``ed, stride-0 caches:
  the fast faces would write several logical rows to one memory row and attend to the last writer);
* :func:`check_face_dtype` — what a face cannot compute: fp64 on the fp32 faces, and bf16 on interpreted Triton
  (the CPU interpreter emulates bf16 loads wrongly: outputs off by ~1e9 relative; bf16 Triton is tested on GPUs);
* :func:`face_for` — the empty-input rule: a call with an empty input runs on the reference face (exact, no
  kernel launch), so empty in gives empty or zero outputs and exact zero gradients on every face;
* :func:`check_distinct` — two tensors written in place must not be the same memory.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import backend as _backend


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
    """Refuse a dtype ``face`` cannot compute correctly, with the reason and the alternative. ``fp64_faces``: the
    op's faces that take float64."""
    if dtype == torch.float64 and face not in fp64_faces:
        raise TypeError(f"{where}: the {face} face computes in fp32 and does not take float64 inputs (use "
                        f"backend={fp64_faces[0]!r})")
    if face == "triton" and dtype == torch.bfloat16 and _backend.triton_interpreted():
        raise TypeError(f"{where}: bfloat16 on the interpreted Triton face (TRITON_INTERPRET=1) is refused: the CPU "
                        "interpreter computes bf16 wrongly. bf16 Triton runs on a GPU; on CPU use float16/float32, "
                        "or backend='cpp' / 'reference' for bf16")


def is_empty(*tensors: torch.Tensor) -> bool:
    """True when some input has no element, i.e. the op has no work (outputs and gradients are zeros)."""
    return any(t is not None and t.numel() == 0 for t in tensors)


def face_for(face: str, *tensors: torch.Tensor) -> str:
    """The face that runs a call: ``face``, or the reference when an input is empty. Zero-sized launches, grids and
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
