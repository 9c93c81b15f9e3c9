"""Which backends of each op exist here, and which one a call uses.

Every op has up to four backends:

=============  ===========================================  ==========================
backend        what it is                                   runs on
=============  ===========================================  ==========================
``reference``  plain PyTorch (``mirai_kernels/reference``)   any device, any dtype
``triton``     Triton kernels (``mirai_kernels/triton``)     CUDA; CPU via the interpreter
``cpp``        C++ CPU kernels (``csrc/*.cpp``, ``_C``)      CPU
``cuda``       CUDA C++ kernels (``csrc/cuda``, ``_C_cuda``)  CUDA
=============  ===========================================  ==========================

A call picks its backend from, in order: the ``backend=`` argument of the public function, the innermost
:func:`use_backend` context, :func:`set_backend`, the ``MIRAI_BACKEND`` environment variable, and finally
``"auto"``. An explicit backend that cannot run the call raises :class:`BackendUnavailableError` (never a silent
fallback); ``"auto"`` picks, per device, the first backend in :data:`AUTO_ORDER` that is built, implemented for
the op, and allowed:

* ``auto`` never picks interpreted Triton (``TRITON_INTERPRET=1``): it is a correctness tool, orders of
  magnitude slower than the reference;
* ``auto`` never picks a backend that failed ``python -m mirai_kernels.selftest`` on this machine (the user's
  selftest record, see :func:`selftest_cache_path`), on any device;
* otherwise ``auto`` picks a GPU backend (``triton``/``cuda``) only when it is validated for this device kind
  (:func:`device_kind`, e.g. ``"sm_90"``) by the committed record or by this machine's selftest record. The
  committed record is :data:`GPU_VALIDATED` below, filled by ``benchmarks/record_gpu_results.py`` from the
  committed GPU suite results under ``benchmarks/results/`` (each entry names the result file that shows the
  op/backend's ``pytest -m gpu`` tests passing; :data:`GPU_VALIDATED_ON` the device kinds they passed on). A backend
  validated by neither runs on a GPU only when asked for by name; the first time ``auto`` falls back to the
  reference on CUDA for that reason it logs one warning naming ``python -m mirai_kernels.selftest``.

The selftest record is a JSON file keyed by device kind; a record made under another torch, Triton or
mirai_kernels version is stale and ignored as a whole (one warning says so); an unreadable file is ignored
likewise. Under ``torch.compile`` the verdicts are read once at trace time.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
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

GPU_FACES = ("triton", "cuda")

# The committed record. (op, backend) -> the committed result file showing that backend's GPU tests passing;
# GPU_VALIDATED_ON: (op, backend) -> the device kinds they passed on (an entry without one, only ever written by
# hand, counts for every kind). Empty until a session with a GPU runs benchmarks/gpu_suite.sh and commits it.
# BEGIN GPU_VALIDATED (written by benchmarks/record_gpu_results.py; edit the results, not these lines)
GPU_VALIDATED: dict[tuple[str, str], str] = {}
GPU_VALIDATED_ON: dict[tuple[str, str], tuple[str, ...]] = {}
# END GPU_VALIDATED

# Which backends each op implements, and which of its compiled backends' extensions lack its kernels
# (backend -> why);
# each ops/<op>.py declares itself (mirai_kernels.ops._registry.declare), which registers it here at import.
_OP_FACES: dict[str, tuple[str, ...]] = {}
_OP_MISSING: dict[str, dict[str, str]] = {}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is requested by name but cannot run the call."""


def register_op_faces(op: str, faces: tuple[str, ...], missing: dict[str, str] | None = None) -> None:
    """Declare which backends ``op`` implements, and (``missing``) which of them are built without its kernels, with
    the reason (called once per op, by :func:`mirai_kernels.ops._registry.declare`)."""
    unknown = set(faces) - set(FACES)
    if unknown:
        raise ValueError(f"{op}: unknown backends {sorted(unknown)}; backends are {FACES}")
    _OP_FACES[op] = tuple(faces)
    _OP_MISSING[op] = dict(missing or {})


def op_faces(op: str) -> tuple[str, ...]:
    """The backends ``op`` implements (whether or not they are built here)."""
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


# Probed once at import (importing an extension registers its ops), so that choosing a backend is plain dict/bool
# lookups that torch.compile traces without graph breaks.
_EXTENSION_ERRORS = {name: _import_error(name) for name in ("mirai_kernels._C", "mirai_kernels._C_cuda")}
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _extension_error(module: str) -> str | None:
    return _EXTENSION_ERRORS[module]


def cpp_available() -> bool:
    """True when the C++ CPU extension ``mirai_kernels._C`` imported (it registers the CPU kernels, backend ``cpp``)."""
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
        return f"{op} has no {face!r} backend (it has {', '.join(op_faces(op))})"
    if face == "reference":
        return None
    if face == "cpp":
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors, got {device.type} tensors"
        if not cpp_available():
            return (
                "the C++ extension mirai_kernels._C is not built or failed to import "
                f"({_extension_error('mirai_kernels._C')}); run `pip install --no-build-isolation -e .`"
            )
        return _OP_MISSING.get(op, {}).get(face)
    if face == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got {device.type} tensors"
        if not cuda_ext_available():
            return (
                "the CUDA extension mirai_kernels._C_cuda is not built "
                f"({_extension_error('mirai_kernels._C_cuda')}); rebuild with MIRAI_CUDA=1 "
                "`pip install --no-build-isolation -e .`"
            )
        return _OP_MISSING.get(op, {}).get(face)
    if face == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return (
                "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing "
                "mirai_kernels"
            )
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' runs on CUDA (or interpreted on CPU), got {device.type} tensors"
        return None
    raise ValueError(f"unknown backend {face!r}")


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
    """The backend ``auto`` picks for ``op`` on ``device`` (rules in the module docstring)."""
    kind = device_kind(device)
    unvalidated = []
    for face in AUTO_ORDER.get(device.type, ("reference",)):
        if face_unavailable_reason(op, face, device) is not None:
            continue
        if face == "triton" and triton_interpreted():
            continue
        if face == "reference":
            break
        verdict = _selftest_verdict(op, face, kind)
        if verdict == "fail":  # failed on this machine: never picked, whatever any other record says
            continue
        if device.type != "cpu" and face in GPU_FACES and verdict != "pass" and not committed_validated(op, face, kind):
            unvalidated.append(face)
            continue
        return face
    if unvalidated and device.type == "cuda":
        _warn_unvalidated_once(op, kind, tuple(unvalidated))
    return "reference"


# ---------------------------------------------------------------------------------------------------------
# Device kinds, the committed record, this machine's selftest record
# ---------------------------------------------------------------------------------------------------------

SELFTEST_COMMAND = "python -m mirai_kernels.selftest"
_log = logging.getLogger("mirai_kernels")


@torch._dynamo.assume_constant_result
def _cuda_device_kind(index: int) -> str | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(index if index >= 0 else torch.cuda.current_device())
    return f"sm_{major}{minor}"


def device_kind(device: torch.device) -> str | None:
    """What a validation record is keyed by: ``"cpu"``, the compute capability of a CUDA device (``"sm_90"``:
    the same kernels compile to the same code on every device of one capability), or None when it cannot be
    told (no usable CUDA, another device type)."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return _cuda_device_kind(-1 if device.index is None else device.index)
    return None


def committed_validated(op: str, face: str, kind: str | None) -> bool:
    """True when the committed record (:data:`GPU_VALIDATED`) validates ``face`` of ``op`` on device kind ``kind``."""
    if (op, face) not in GPU_VALIDATED:
        return False
    kinds = GPU_VALIDATED_ON.get((op, face))
    return kinds is None or kind in kinds


def selftest_cache_path() -> str:
    """The user's selftest record: ``$MIRAI_SELFTEST_CACHE``, else ``$XDG_CACHE_HOME/mirai_kernels/selftest.json``
    (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    explicit = os.environ.get("MIRAI_SELFTEST_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mirai_kernels", "selftest.json")


def software_versions() -> dict[str, str | None]:
    """The versions a selftest record is only valid for: torch, Triton, mirai_kernels."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    import mirai_kernels  # the package is fully imported by the time a backend is chosen

    return {"torch": torch.__version__, "triton": triton_version,
            "mirai_kernels": getattr(mirai_kernels, "__version__", None)}


_selftest_state: dict = {}  # path -> {kind: {"op/face": verdict}}; warnings already given
_warned: set = set()


def reload_selftest_record() -> None:
    """Forget the loaded selftest record (the selftest calls this after writing; tests after changing it)."""
    _selftest_state.clear()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(message)


def _load_selftest_record(path: str) -> dict:
    """{device kind: {"op/face": "pass" | "fail"}} from the user's record, stale and unreadable records dropped."""
    try:
        with open(path) as f:
            data = json.load(f)
        records = data["records"]
        if not isinstance(records, dict):
            raise ValueError("'records' is not an object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _warn_once(("unreadable", path), f"mirai_kernels: ignoring the selftest record {path} ({type(exc).__name__}: "
                                          f"{exc}); run `{SELFTEST_COMMAND}` to rewrite it")
        return {}
    now = software_versions()
    verdicts = {}
    for kind, record in records.items():
        made_with = {key: record.get(key) for key in now} if isinstance(record, dict) else {}
        if made_with != now:
            changed = ", ".join(f"{k} {made_with.get(k)} -> {v}" for k, v in now.items() if made_with.get(k) != v)
            _warn_once(("stale", path, kind), f"mirai_kernels: the selftest record for {kind} in {path} is stale "
                                              f"({changed}) and is ignored; run `{SELFTEST_COMMAND}` again")
            continue
        faces = record.get("faces", {})
        verdicts[kind] = {key: v for key, v in faces.items() if v in ("pass", "fail")}
    return verdicts


@torch._dynamo.assume_constant_result
def _selftest_verdict(op: str, face: str, kind: str | None) -> str:
    """"pass", "fail" or "" (no valid record) for ``face`` of ``op`` on this machine's device ``kind``."""
    if kind is None:
        return ""
    path = selftest_cache_path()
    if path not in _selftest_state:
        _selftest_state.clear()
        _selftest_state[path] = _load_selftest_record(path)
    return _selftest_state[path].get(kind, {}).get(f"{op}/{face}", "")


@torch._dynamo.assume_constant_result
def _warn_unvalidated_once(op: str, kind: str | None, faces: tuple) -> bool:
    _warn_once("unvalidated", (
        f"mirai_kernels: `auto` runs {op} (and any other op in the same case) with the plain-PyTorch reference on "
        f"this GPU ({kind}): its {'/'.join(faces)} backend is not validated for {kind} yet. Run `{SELFTEST_COMMAND}` "
        f"once (well under a minute) to validate the fast backends on this machine, or pass backend= explicitly."))
    return True


def select_face(op: str, device: torch.device, backend: str | None = None) -> str:
    """Resolve ``backend`` (or the current default) to the backend that runs ``op`` on ``device``.

    Raises :class:`BackendUnavailableError` with the reason when a backend requested by name cannot run."""
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
