"""Triton kernels and their launchers, one module per op. Imported lazily by ``mirai_kernels.ops`` so that the
package imports without Triton and ``TRITON_INTERPRET`` can still be set after ``import mirai_kernels``."""
