"""``nn.Module`` wrappers over the public functional API."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops.rope import apply_rope_2d, rope_2d_table


class Rope2D(nn.Module):
    """LlamaGen's 2D RoPE as a module holding its table (a non-persistent buffer: it moves with ``.to()`` and is
    rebuilt, not loaded, so checkpoints stay LlamaGen-compatible).

    ``forward(x, positions=None)`` with x ``(batch, seqlen, nheads, head_dim)``; see :func:`apply_rope_2d`.
    """

    def __init__(self, grid, head_dim: int, prefix: int = 1, base: float = 10000.0, backend: Optional[str] = None):
        super().__init__()
        self.grid, self.head_dim, self.prefix, self.base, self.backend = grid, head_dim, prefix, base, backend
        self.register_buffer("table", rope_2d_table(grid, head_dim, prefix, base), persistent=False)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        return apply_rope_2d(x, self.table, positions, backend=self.backend)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, head_dim={self.head_dim}, prefix={self.prefix}, base={self.base}"
