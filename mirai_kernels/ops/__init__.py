"""The doors: one module per op (``ops/<op>.py``) that declares the op once (:mod:`._registry`: backends,
``torch.ops.mirai`` schemas, fake kernels, autograd), checks the inputs (:mod:`._checks`) and picks the backend."""

from ._registry import face_op

__all__ = ["face_op"]
