"""What the kernels need to run unchanged under every supported Triton, compiled and interpreted.

``loop_bound(x)``: wrap every ``range()`` bound that is a runtime value (a kernel argument, ``tl.program_id`` or
a loaded scalar). Compiled, it is the identity (inlined; the loop is exactly the one written). In the interpreter
of Triton < 3.7 a runtime scalar is a one-element *1-d* numpy array, and ``range()`` converts it with ``int()``,
which NumPy >= 2.5 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.7+
squeezes it first. The interpreted ``loop_bound`` hands ``range()`` a Python int, so loops over runtime bounds run
under both interpreters. It must only wrap values whose one element is the bound (a scalar, never a block).
"""

from __future__ import annotations

import triton

from ..backend import triton_interpreted

if triton_interpreted():
    # Kernels are plain Python in the interpreter and may call any Python function.

    def loop_bound(x):
        handle = getattr(x, "handle", None)
        data = getattr(handle, "data", None)
        if data is None:  # a Python int or constexpr already
            return x
        if data.size != 1:
            raise ValueError(f"loop_bound takes a scalar, got a block of shape {data.shape}")
        return int(data.reshape(()))

else:

    @triton.jit
    def loop_bound(x):
        return x
