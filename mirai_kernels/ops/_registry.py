"""One declaration per op: its backends (faces), ``torch.ops.mirai`` schemas, fake kernels, autograd formula and
dispatch, written once in the op's door (``ops/<op>.py``) with :func:`declare`.

An op has one or more *stages* (``""`` for a single op, or e.g. ``"fwd"`` and ``"bwd"``), each with one schema.
Per stage, :func:`declare` makes two ``torch.ops.mirai`` ops:

* ``mirai::<op>[_<stage>]`` — the compiled backends, one op with one kernel per device (the torch.library way):
  backend ``cpp`` is its CPU kernel (``csrc/<op>.cpp``, extension ``mirai_kernels._C``), backend ``cuda`` its CUDA
  kernel (``csrc/cuda/<op>.cu``, ``mirai_kernels._C_cuda``). The schema is defined here, once; the C++ files only
  add kernels (``TORCH_LIBRARY_IMPL(mirai, CPU|CUDA, m) { m.impl("<op>[_<stage>]", ...); }``).
* ``mirai::<op>[_<stage>]_triton`` — backend ``triton``, a ``torch.library.custom_op`` with the same schema. It is
  a separate op because it shares a device with both compiled backends (CUDA with ``cuda``; CPU, under
  ``TRITON_INTERPRET=1``, with ``cpp``), and one op has one kernel per device.

Every one of them gets the stage's fake kernel and, when declared, the autograd formula; the ``reference`` backend
is plain PyTorch and differentiates through autograd. :meth:`Op.select` is the door's dispatch (backend choice,
dtype guard, the empty-input rule), :meth:`Op.op` the op a backend runs, and :func:`face_op` the one accessor
tests and ``opcheck`` use. A new op is a door that calls :func:`declare`, its backends and a reference: nothing
here changes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .. import backend as _backend
from . import _checks

NAMESPACE = "mirai"
COMPILED_FACES = {"cpp": "CPU", "cuda": "CUDA"}  # backend -> the dispatch key of its kernel in mirai::<op>

# Holds the definitions of the compiled ops: a Library deregisters what it defined when it is collected.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_OPS: dict[str, "Op"] = {}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One ``torch.ops.mirai`` op of an op family.

    schema: ``"(Tensor x, ...) -> Tensor"``, alias annotations (``Tensor(a!)``) on what it writes in place;
        integers as ``SymInt`` (what ``custom_op`` infers from ``int``: torch.compile then traces a size-derived
        argument symbolically; a C++ kernel takes it as ``int64_t``).
    triton: the Triton backend's implementation (imports ``mirai_kernels.triton`` lazily: Triton is optional and
        reads ``TRITON_INTERPRET`` when it decorates); None for an op without a Triton backend.
    fake: the fake (meta) kernel: output shapes, dtypes and strides from the inputs.
    autograd: None (no gradient: an inference op, or a stage that is itself a backward), or
        ``make(ops) -> (backward, setup_context)`` for ``torch.library.register_autograd``; ``ops`` maps each stage
        name to the op of the *same backend*, so a backward calls its own backend's backward stage.
    """

    schema: str
    triton: Optional[Callable]
    fake: Callable
    autograd: Optional[Callable] = None


def _mutated_args(schema: str) -> tuple[str, ...]:
    parsed = torch._C.parse_schema(f"{NAMESPACE}::_probe{schema}")
    return tuple(a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write)


class Op:
    """A declared op (see the module docstring); made by :func:`declare`."""

    def __init__(self, name: str, faces: tuple[str, ...], fp64_faces: tuple[str, ...], stages: dict[str, Stage]):
        self.name, self.faces, self.fp64_faces, self.stages = name, tuple(faces), tuple(fp64_faces), dict(stages)
        compiled = [f for f in self.faces if f in COMPILED_FACES]
        for stage_name, stage in self.stages.items():
            if compiled:
                _LIB.define(self.op_name(compiled[0], stage_name) + stage.schema)
            if "triton" in self.faces:
                torch.library.custom_op(self.qualname("triton", stage_name), stage.triton,
                                        mutates_args=_mutated_args(stage.schema), device_types=("cuda", "cpu"),
                                        schema=stage.schema)
        for face in ([compiled[0]] if compiled else []) + (["triton"] if "triton" in self.faces else []):
            ops = {s: self.op(face, s) for s in self.stages}
            for stage_name, stage in self.stages.items():
                qualname = self.qualname(face, stage_name)
                torch.library.register_fake(qualname)(stage.fake)
                if stage.autograd is not None:
                    backward, setup_context = stage.autograd(ops)
                    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        _backend.register_op_faces(name, self.faces, missing=self._missing_kernels())

    def op_name(self, face: str, stage: str = "") -> str:
        """``<op>[_<stage>]`` for the compiled backends, ``<op>[_<stage>]_triton`` for Triton."""
        if face not in self.faces or face == "reference":
            raise ValueError(f"{self.name} has no {face!r} op (its backends: {', '.join(self.faces)})")
        if stage not in self.stages:
            raise ValueError(f"{self.name} has no stage {stage!r} (stages: {', '.join(map(repr, self.stages))})")
        base = f"{self.name}_{stage}" if stage else self.name
        return f"{base}_triton" if face == "triton" else base

    def qualname(self, face: str, stage: str = "") -> str:
        return f"{NAMESPACE}::{self.op_name(face, stage)}"

    def op(self, face: str, stage: str = ""):
        """The ``torch.ops.mirai`` op (an OpOverloadPacket) that backend ``face`` runs for ``stage``."""
        return getattr(getattr(torch.ops, NAMESPACE), self.op_name(face, stage))

    def select(self, device: torch.device, backend: Optional[str], dtype: torch.dtype, *inputs) -> str:
        """The backend that runs this call: ``backend`` resolved for ``device`` (raises when it cannot run here),
        refused when it cannot compute ``dtype``, and the reference when an input is empty (no work, no launch)."""
        face = _backend.select_face(self.name, device, backend)
        _checks.check_face_dtype(self.name, face, dtype, self.fp64_faces)
        return _checks.face_for(face, *inputs)

    def _missing_kernels(self) -> dict[str, str]:
        """Compiled backends whose extension imported but has no kernel for one of the stages (built from older
        sources): face -> reason."""
        built = {"cpp": _backend.cpp_available(), "cuda": _backend.cuda_ext_available()}
        missing = {}
        for face, key in COMPILED_FACES.items():
            if face in self.faces and built[face]:
                absent = [self.qualname(face, s) for s in self.stages
                          if not torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname(face, s), key)]
                if absent:
                    missing[face] = (f"the built extension has no {key} kernel for {', '.join(absent)} (built from "
                                     "older sources? rebuild: `pip install --no-build-isolation -e .`)")
        return missing


def declare(name: str, *, faces: tuple[str, ...], fp64_faces: tuple[str, ...], stages: dict[str, Stage]) -> Op:
    """Declare op ``name`` (the public function's name; what ``backend`` selection and the selftest key on):
    ``faces`` the backends it implements, ``fp64_faces`` those that compute float64 (the others compute in fp32
    and refuse it), ``stages`` its ``torch.ops.mirai`` ops."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is declared twice")
    unknown = set(fp64_faces) - set(faces)
    if unknown or "reference" not in fp64_faces:
        raise ValueError(f"{name}: fp64_faces {fp64_faces} must include 'reference' and name only its backends")
    _OPS[name] = op = Op(name, faces, fp64_faces, stages)
    return op


def declared() -> dict[str, Op]:
    """Every declared op by name."""
    return dict(_OPS)


def face_op(op: str, face: str, stage: str = ""):
    """The ``torch.ops.mirai`` OpOverload that backend ``face`` of op ``op`` runs for ``stage``: the one accessor
    for tests and ``opcheck`` (``face_op("dual_attention", "cpp", "bwd")``)."""
    return _OPS[op].op(face, stage).default


def missing_kernels() -> list[str]:
    """What CI asserts empty: for every declared op, each compiled backend's kernel that is not registered (its
    extension not built, failed to import, or built without it)."""
    out = []
    for op in _OPS.values():
        for face, key in COMPILED_FACES.items():
            if face in op.faces:
                for stage in op.stages:
                    qualname = op.qualname(face, stage)
                    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
                        out.append(f"{qualname} ({key})")
    return out
