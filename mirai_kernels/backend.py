"""Which faces of each op exist here, and which one a call uses.

Every op has up to four faces:

=============  ===========================================  ==========================
face           what it is                                   runs on
=============  ===========================================  ==========================
``reference``  plain PyTorch (``mirai_kernels/reference``)   any device, any dtype
``triton``     Triton kernels (``mirai_kernels/triton``)     CUDA; CPU via the interpreter
``cpp``        C++ CPU kernels (``csrc/*.cpp``, ``_C``)      CPU
``cuda``       CUDA C++ kernels (``csrc/cuda``, ``_C_cuda``)  CUDA
=============  ===========================================  ==========================

A call picks its face from, in order: the ``backend=`` argument of the public function, the innermost
:func:`use_backend` context, :func:`set_backend`, the ``MIRAI_BACKEND`` environment variable, and finally
``"auto"``. An explicit face that cannot run the call raises :class:`BackendUnavailableError` (never a silent
fallback); ``"auto"`` picks, per device, the first face in :data:`AUTO_ORDER` that is built, implemented for
the op, and allowed:

* ``auto`` never picks interpreted Triton (``TRITON_INTERPRET=1``): it is a correctness tool, orders of
  magnitude slower than the reference;
* ``auto`` never picks a GPU face (``triton``/``cuda``) whose GPU tests have not passed on a real GPU. That
  record is :data:`GPU_VALIDATED` below: each entry names the committed result file under
  ``benchmarks/results/`` that shows ``pytest -m gpu`` passing for that op and face. An op/face missing from
  it runs on a GPU only when asked for by name.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from typing import Iterator

import torch

FACES = ("reference", "triton", "cpp", "cuda")
BACKENDS = ("auto",) + FACES

# Preference order of ``auto`` per device type. The reference ends every list, so ``auto`` always resolves.
AUTO_ORDER = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# (op, face) -> committed result file proving that face's GPU tests passed on a real GPU.
# Empty until a session with a GPU runs benchmarks/gpu_suite.sh and commits its JSON.
GPU_VALIDATED: dict[tuple[str, str], str] = {}

# Which faces each op implements; each ops/<op>.py registers itself here at import.
_OP_FACES: dict[str, tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is requested by name but cannot run the call."""


def register_op_faces(op: str, faces: tuple[str, ...]) -> None:
    """Declare which faces ``op`` implements (called once by ``ops/<op>.py``)."""
    unknown = set(faces) - set(FACES)
    if unknown:
        raise ValueError(f"{op}: unknown faces {sorted(unknown)}; faces are {FACES}")
    _OP_FACES[op] = tuple(faces)


def op_faces(op: str) -> tuple[str, ...]:
    """The faces ``op`` implements (whether or not they are built here)."""
    return _OP_FACES[op]


# ---------------------------------------------------------------------------------------------------------
# What is built / importable here
# ---------------------------------------------------------------------------------------------------------


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as exc:  # not built, or built against another torch
        return f"{type(exc).__name__}: {exc}"
    return None


# Probed once at import (importing an extension registers its ops), so that choosing a face is plain dict/bool
# lookups that torch.compile traces without graph breaks.
_EXTENSION_ERRORS = {name: _import_error(name) for name in ("mirai_kernels._C", "mirai_kernels._C_cuda")}
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _extension_error(module: str) -> str | None:
    return _EXTENSION_ERRORS[module]


def cpp_available() -> bool:
    """True when the C++ CPU extension ``mirai_kernels._C`` imported (it registers the ``*_cpp`` ops)."""
    return _EXTENSION_ERRORS["mirai_kernels._C"] is None


def cuda_ext_available() -> bool:
    """True when the CUDA extension ``mirai_kernels._C_cuda`` was built and imported."""
    return _EXTENSION_ERRORS["mirai_kernels._C_cuda"] is None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter. Triton reads ``TRITON_INTERPRET`` when a kernel is
    decorated, so this must be set before ``mirai_kernels`` is imported (``tests/conftest.py`` does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def debug_checks() -> bool:
    """``MIRAI_DEBUG=1`` turns on checks that read device values (index ranges...). They synchronise the host
    with the GPU, so they are off by default; on CPU tensors they always run."""
    return os.environ.get("MIRAI_DEBUG", "0") == "1"


def face_unavailable_reason(op: str, face: str, device: torch.device) -> str | None:
    """Why ``face`` of ``op`` cannot run on ``device`` here, or None when it can."""
    if face not in op_faces(op):
        return f"{op} has no {face!r} face (it has {', '.join(op_faces(op))})"
    if face == "reference":
        return None
    if face == "cpp":
        if device.type != "cpu":
            return f"the 'cpp' face runs on CPU tensors, got {device.type} tensors"
        if not cpp_available():
            return (
                "the C++ extension mirai_kernels._C is not built or failed to import "
                f"({_extension_error('mirai_kernels._C')}); run `pip install --no-build-isolation -e .`"
            )
        return None
    if face == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' face runs on CUDA tensors, got {device.type} tensors"
        if not cuda_ext_available():
            return (
                "the CUDA extension mirai_kernels._C_cuda is not built "
                f"({_extension_error('mirai_kernels._C_cuda')}); rebuild with MIRAI_CUDA=1 "
                "`pip install --no-build-isolation -e .`"
            )
        return None
    if face == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return (
                "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing "
                "mirai_kernels"
            )
        if device.type not in ("cpu", "cuda"):
            return f"the 'triton' face runs on CUDA (or interpreted on CPU), got {device.type} tensors"
        return None
    raise ValueError(f"unknown face {face!r}")


# ---------------------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------------------

_state = threading.local()
_global_default: str | None = None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores ``MIRAI_BACKEND`` / ``"auto"``)."""
    global _global_default
    _global_default = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` for calls inside the ``with`` block (this thread only) that pass ``backend=None``."""
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(_check_name(name))
    try:
        yield
    finally:
        stack.pop()


def get_backend() -> str:
    """The backend a call with ``backend=None`` uses now (before ``auto`` is resolved)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_default is not None:
        return _global_default
    return _check_name(os.environ.get("MIRAI_BACKEND", "auto"))


def auto_face(op: str, device: torch.device) -> str:
    """The face ``auto`` picks for ``op`` on ``device``."""
    for face in AUTO_ORDER.get(device.type, ("reference",)):
        if face_unavailable_reason(op, face, device) is not None:
            continue
        if face == "triton" and triton_interpreted():
            continue
        if device.type != "cpu" and face in ("triton", "cuda") and (op, face) not in GPU_VALIDATED:
            continue
        return face
    return "reference"


def select_face(op: str, device: torch.device, backend: str | None = None) -> str:
    """Resolve ``backend`` (or the current default) to the face that runs ``op`` on ``device``.

    Raises :class:`BackendUnavailableError` with the reason when a face requested by name cannot run."""
    name = _check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        return auto_face(op, device)
    reason = face_unavailable_reason(op, name, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} unavailable: {reason}")
    return name


def available_faces(op: str, device: torch.device) -> list[str]:
    """Faces of ``op`` that can run on ``device`` here (including interpreted Triton)."""
    return [f for f in op_faces(op) if face_unavailable_reason(op, f, device) is None]
