"""Reference of the Mirai foresight loss: offset parsing, the pairing rule and the shifted cosine loss.

The pairing (docs/method.md, "Foresight loss") on a sequence of length N = prefix + H*W - 1 (LlamaGen training):
position ``p >= prefix`` holds the state that consumed grid cell ``p - prefix`` (raster order); for foresight head k
with raster offset ``o_k`` it pairs with target position ``p + o_k``, dropped when that is ``>= N``. With
``boundary="grid"`` a pair is also dropped when the offset's column step leaves the row (cell column + dx >= W);
``boundary="raster"`` is the paper-exact flat offset that wraps to the next row. Prefix positions (the class token)
pair with themselves in every head when ``align_prefix`` (the paper code), and are dropped otherwise (Mirai-I).

Cosine convention (shared by every backend): ``cos(s, t) = <s, t> / (max(|s|, EPS) * max(|t|, EPS))`` with
``EPS = 1e-4``, as ``F.normalize`` with that eps. A zero vector has cosine 0 and a finite gradient: every
gradient of a cosine is at most ``1 / EPS = 1e4`` per unit of upstream gradient, which fp16 holds (the paper's
``F.normalize`` default, 1e-12, would overflow fp16 on a zero projection). Real projections and targets have norms
far above 1e-4 (GPT-B hidden states: ~sqrt(768)), so the choice changes no loss in practice.
"""

from __future__ import annotations

from typing import Sequence

import torch

# The one definition; the Triton backend imports it, csrc/foresight.h states it again for C++ (a test checks).
EPS = 1e-4
BOUNDARIES = ("raster", "grid")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the cosines and losses are computed in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_grid(grid) -> tuple[int, int]:
    """``grid`` as ``(H, W)``; an int means a square grid."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (H, W) or an int, got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"grid must have positive sides, got {(h, w)}")
    return h, w


def parse_offsets(offsets, grid) -> tuple[tuple[int, int, int], ...]:
    """Offsets as ``(raster, dy, dx)`` triples.

    Each entry is a raster int ``o >= 0`` (its grid step is ``divmod(o, W)``) or a ``(dy, dx)`` pair with
    ``dy >= 0`` and ``0 <= dx < W`` (raster ``dy * W + dx``). Raises ``ValueError`` on anything else."""
    h, w = normalize_grid(grid)
    if isinstance(offsets, int) and not isinstance(offsets, bool):
        offsets = [offsets]
    offsets = list(offsets)
    if not offsets:
        raise ValueError("offsets must name at least one foresight head, got an empty list")
    out = []
    for off in offsets:
        if isinstance(off, bool):
            raise ValueError(f"offset {off!r} is a bool; offsets are raster ints or (dy, dx) pairs")
        if isinstance(off, int) or (isinstance(off, torch.Tensor) and off.dim() == 0):
            o = int(off)
            if o < 0:
                raise ValueError(f"offsets must be >= 0 (foresight looks forward), got {o}")
            dy, dx = divmod(o, w)
        else:
            try:
                dy, dx = (int(v) for v in off)
            except (TypeError, ValueError):
                raise ValueError(f"offset {off!r} is neither a raster int nor a (dy, dx) pair") from None
            if dy < 0 or dx < 0:
                raise ValueError(f"offset (dy, dx) = {(dy, dx)}: dy and dx must be >= 0")
            if dx >= w:
                raise ValueError(f"offset (dy, dx) = {(dy, dx)}: dx must be < W = {w}")
            o = dy * w + dx
        out.append((o, dy, dx))
    return tuple(out)


def _pairing_list(n, grid, prefix, offsets, boundary, align_prefix):
    h, w = grid
    table = []
    for p in range(n):
        row = []
        for o, _dy, dx in offsets:
            if p < prefix:
                row.append(p if align_prefix else -1)
                continue
            col = (p - prefix) % w
            q = p + o
            if q >= n or (boundary == "grid" and col + dx >= w):
                row.append(-1)
            else:
                row.append(q)
        table.append(row)
    return table


def pairing_table(n: int, grid, prefix: int, offsets, boundary: str = "raster", align_prefix: bool = True,
                  device=None) -> torch.Tensor:
    """int32 ``(N, K)``: the target position each student position pairs with per foresight head, -1 if none.

    ``offsets`` may be raw (ints / (dy, dx) pairs) or already parsed triples."""
    grid = normalize_grid(grid)
    check_pairing_args(n, grid, prefix, boundary)
    if not (offsets and isinstance(offsets, tuple) and all(isinstance(t, tuple) and len(t) == 3 for t in offsets)):
        offsets = parse_offsets(offsets, grid)
    for o, dy, dx in offsets:
        if n and o >= n:  # N = 0 (an empty sequence) pairs nothing at any offset
            raise ValueError(f"offset {o} (dy, dx = {dy}, {dx}) must be < N = {n} (it would pair nothing)")
    table = _pairing_list(n, grid, prefix, offsets, boundary, bool(align_prefix))
    return torch.tensor(table, dtype=torch.int32, device=device).reshape(n, len(offsets))


def check_pairing_args(n: int, grid: tuple[int, int], prefix: int, boundary: str) -> None:
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"prefix must be an int >= 0, got {prefix!r}")
    h, w = grid
    if n > prefix + h * w:
        raise ValueError(
            f"sequence length N = {n} exceeds prefix + H*W = {prefix} + {h}*{w}: positions past the grid have no "
            "cell (LlamaGen training uses N = prefix + H*W - 1)"
        )


def grid_to_sequence(features: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Patch-indexed encoder features ``(B, H*W, Z)`` → sequence-indexed targets ``(B, prefix + H*W - 1, Z)``.

    Position ``prefix + j`` gets cell ``j``; the last cell (no input position consumes it) is dropped and the
    ``prefix`` rows are zeros (use ``align_prefix=False`` with such targets)."""
    b, _, z = features.shape
    pad = features.new_zeros(b, prefix, z)
    return torch.cat([pad, features[:, :-1]], dim=1)


def pairwise_cosine(proj: torch.Tensor, targets: torch.Tensor, tpos: torch.Tensor) -> torch.Tensor:
    """``cos[b, p, k] = cos(proj[b, p, k], targets[b, tpos[p, k]])``, 0 where ``tpos`` is -1. fp32 (fp64 for fp64
    inputs), ``(B, N, K)``. This is what the ``foresight_cos`` backends compute."""
    acc = acc_dtype(proj.dtype)
    s = proj.to(acc)
    t = targets.to(acc).detach()
    valid = tpos >= 0
    idx = tpos.clamp(min=0).long()  # (N, K)
    t_paired = t[:, idx]  # (B, N, K, Z)
    # Unpaired (position, head) entries are zeroed before the maths, so whatever they hold (NaN, Inf) reaches
    # neither the loss nor the gradient (0 * NaN would), as in the fast backends, which never read them.
    zero = torch.zeros((), dtype=acc, device=s.device)
    valid_rows = valid.to(s.device)[None, :, :, None]
    s = torch.where(valid_rows, s, zero)
    t_paired = torch.where(valid_rows, t_paired, zero)
    s_hat = s / s.norm(dim=-1, keepdim=True).clamp(min=EPS)
    t_hat = t_paired / t_paired.norm(dim=-1, keepdim=True).clamp(min=EPS)
    cos = (s_hat * t_hat).sum(-1)
    return torch.where(valid.to(cos.device), cos, torch.zeros((), dtype=acc, device=cos.device))


def pair_counts(tpos: torch.Tensor) -> torch.Tensor:
    """Valid pairs per foresight head per sample, ``(K,)`` int64."""
    return (tpos >= 0).sum(0)


def reduce_heads(cos: torch.Tensor, tpos: torch.Tensor, head_weights=None):
    """``(total, per_head)`` from pairwise cosines: per_head[k] = -mean over (batch, valid pairs of head k); a head
    with no valid pair contributes 0. total = sum_k head_weights[k] * per_head[k]."""
    batch = cos.shape[0]
    counts = (pair_counts(tpos) * batch).clamp(min=1).to(cos.dtype)
    per_head = -cos.sum(dim=(0, 1)) / counts
    return weighted_total(per_head, head_weights), per_head


def weighted_total(per_head: torch.Tensor, head_weights=None) -> torch.Tensor:
    """``sum_k head_weights[k] * per_head[k]`` (weights 1 by default)."""
    if head_weights is None:
        return per_head.sum()
    return (torch.as_tensor(head_weights, dtype=per_head.dtype, device=per_head.device) * per_head).sum()


def linear_projection(x: torch.Tensor, weight: torch.Tensor, bias, input_activation=None) -> torch.Tensor:
    """``proj[b, n, k] = weight[k] @ act(x[b, n, k]) + bias[k]`` (act: identity or SiLU), in at least fp32: the
    heads' last Linear that :func:`mirai_kernels.fused_linear_cosine_loss` fuses with the loss."""
    acc = acc_dtype(x.dtype)
    xa = torch.nn.functional.silu(x.to(acc)) if input_activation == "silu" else x.to(acc)
    proj = torch.einsum("bnkh,kzh->bnkz", xa, weight.to(acc))
    if bias is not None:
        proj = proj + bias.to(acc)
    return proj


def foresight_cosine_loss(proj, targets, offsets, *, grid, prefix=1, boundary="raster", align_prefix=True,
                          head_weights=None):
    """Reference of :func:`mirai_kernels.foresight_cosine_loss` (no checks beyond the pairing's)."""
    tpos = pairing_table(proj.shape[1], grid, prefix, offsets, boundary, align_prefix, device=proj.device)
    return reduce_heads(pairwise_cosine(proj, targets, tpos), tpos, head_weights)


def fused_linear_cosine_loss(x, weight, bias, targets, offsets, *, grid, prefix=1, boundary="raster",
                             align_prefix=True, head_weights=None, input_activation=None):
    """Reference of :func:`mirai_kernels.fused_linear_cosine_loss`: ``proj[b,n,k] = weight[k] @ act(x[b,n,k]) +
    bias[k]`` (act: identity or SiLU, :func:`linear_projection`), then the loss above."""
    proj = linear_projection(x, weight, bias, input_activation)
    return foresight_cosine_loss(proj, targets, offsets, grid=grid, prefix=prefix, boundary=boundary,
                                 align_prefix=align_prefix, head_weights=head_weights)


def paper_heads_loss(projs: Sequence[torch.Tensor], targets: torch.Tensor, raster_offsets: Sequence[int],
                     prefix: int = 1):
    """The paper code's formulation (raster boundary, prefix aligned), written the way it is there: per head slice
    the student and the shifted target, cat the prefix back, normalise both, mean of the negative dot. Used by the
    tests as an independent check of the pairing and by the benchmark as the eager baseline."""
    per_head = []
    t = targets.detach()
    for z, o in zip(projs, raster_offsets):
        n = z.shape[1]
        zs = torch.cat([z[:, :prefix], z[:, prefix:n - o]], dim=1)
        zt = torch.cat([t[:, :prefix], t[:, prefix + o:]], dim=1)
        zs = torch.nn.functional.normalize(zs, dim=-1, eps=EPS)
        zt = torch.nn.functional.normalize(zt, dim=-1, eps=EPS)
        per_head.append(-(zs * zt).sum(-1).mean())
    per_head = torch.stack(per_head)
    return per_head.sum(), per_head
