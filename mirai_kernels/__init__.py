"""mirai_kernels: fused kernels for training and sampling autoregressive image generators with foresight.

Public API (every op function takes ``backend=None``; see :mod:`mirai_kernels.backend`):

* :func:`rope_2d_table`, :func:`apply_rope_2d` — LlamaGen's 2D rotary embedding; :class:`Rope2D` module.
* :func:`dual_attention` — causal and bidirectional attention outputs from one pass (forward and backward);
  :class:`ForesightAttention` — a drop-in for LlamaGen's ``Attention`` module over it.
* :func:`foresight_cosine_loss`, :func:`fused_linear_cosine_loss`, :func:`grid_to_sequence` — Mirai's
  multi-offset foresight loss (shifted cosine, optionally fused with the heads' last Linear);
  :class:`ForesightHeads` — the K projector MLPs + loss as one module.
* :func:`decode_attention` — KV-cache decode attention (in-place append, RoPE, split-KV).
* backend control: :func:`set_backend`, :func:`use_backend`, :func:`get_backend`, :func:`available_faces`.
"""

from .backend import BackendUnavailableError, available_faces, get_backend, set_backend, use_backend
from .modules import ForesightAttention, ForesightHeads, Rope2D
from .ops.decode import decode_attention
from .ops.dual_attention import dual_attention
from .ops.foresight import foresight_cosine_loss, fused_linear_cosine_loss, grid_to_sequence
from .ops.rope import apply_rope_2d, rope_2d_table

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ForesightAttention",
    "ForesightHeads",
    "Rope2D",
    "apply_rope_2d",
    "available_faces",
    "decode_attention",
    "dual_attention",
    "foresight_cosine_loss",
    "fused_linear_cosine_loss",
    "get_backend",
    "grid_to_sequence",
    "rope_2d_table",
    "set_backend",
    "use_backend",
]
