"""LlamaGen's 2D rotary position embedding, in plain PyTorch: the specification the other backends are held to.

Convention (LlamaGen ``precompute_freqs_cis_2d`` / ``apply_rotary_emb``):

* the head dim is split into interleaved pairs ``(x[2i], x[2i+1])``, ``i < head_dim/2``;
* pair ``i < head_dim/4`` rotates by ``row * f_i``, pair ``head_dim/4 + i`` by ``col * f_i``, with
  ``f_i = base ** (-2i / (head_dim/2))``;
* the table is ``(prefix + H*W, head_dim/2, 2)`` fp32 holding ``(cos, sin)``; the ``prefix`` (class-token) rows are
  all **zero**, so the rotated class-token q and k are zero vectors — a LlamaGen quirk kept for checkpoint
  compatibility;
* rotation: ``(x0, x1) -> (x0*cos - x1*sin, x1*cos + x0*sin)``.
"""

from __future__ import annotations

import torch


def rope_2d_table(grid, head_dim: int, prefix: int = 1, base: float = 10000.0, device=None) -> torch.Tensor:
    """Reference table builder; see :func:`mirai_kernels.rope_2d_table` for the documented public entry point."""
    height, width = (grid, grid) if isinstance(grid, int) else grid
    quarter = head_dim // 4
    # Same fp32 op order as LlamaGen, so tables (and hence checkpoints' behaviour) are bit-identical.
    freqs = 1.0 / (base ** (torch.arange(0, head_dim // 2, 2, device=device)[:quarter].float() / (head_dim // 2)))
    row_angles = torch.outer(torch.arange(height, device=device), freqs)  # (H, hd/4)
    col_angles = torch.outer(torch.arange(width, device=device), freqs)  # (W, hd/4)
    angles = torch.cat(
        [row_angles[:, None, :].expand(height, width, quarter), col_angles[None, :, :].expand(height, width, quarter)],
        dim=-1,
    ).flatten(0, 1)  # (H*W, hd/2), raster order
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(prefix, head_dim // 2, 2, device=device), table])


def gather_rope_rows(table: torch.Tensor, seqlen: int, positions: torch.Tensor | None) -> torch.Tensor:
    """Table rows for each token, broadcastable against ``(batch, seqlen, nheads, head_dim/2)``:
    ``(1 or batch, seqlen, 1, head_dim/2, 2)``."""
    if positions is None:
        rows = table[:seqlen][None]
    elif positions.dim() == 1:
        rows = table[positions.long()][None]
    else:
        rows = table[positions.long()]
    return rows[:, :, None]


def apply_rope_2d(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor | None = None, conjugate: bool = False):
    """Rotate ``x`` (batch, seqlen, nheads, head_dim) by the table rows of each token; ``conjugate`` rotates by the
    opposite angle (the backward). Computes in ``x``'s precision, at least fp32; returns ``x``'s dtype."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(compute_dtype).unflatten(-1, (-1, 2))
    rows = gather_rope_rows(table, x.shape[1], positions).to(compute_dtype)
    cos, sin = rows[..., 0], rows[..., 1]
    if conjugate:
        sin = -sin
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)
