"""The foresight pairing table that every backend of the foresight ops reads, built once per arguments and device.

The rule itself is the reference's (:func:`mirai_kernels.reference.foresight.pairing_table`); this module only
keeps what it builds. A training run asks for the same few tables every step, so a call is a dict hit; the cache
is bounded (:data:`MAX_ENTRIES`, oldest entry evicted first), since a caller that sweeps grids, sequence lengths or
devices would otherwise grow a module-level dict without limit. Plain dict operations only: torch.compile traces
a hit without a graph break.
"""

from __future__ import annotations

import torch

from ..reference import foresight as _reference

MAX_ENTRIES = 64  # tables (and pair counts) kept; one training setup needs a handful

_CACHE: dict = {}


def _remember(key, value):
    if len(_CACHE) >= MAX_ENTRIES:
        del _CACHE[next(iter(_CACHE))]  # dicts keep insertion order: the oldest entry goes first
    _CACHE[key] = value
    return value


def pairing_table(seqlen: int, grid: tuple[int, int], parsed, prefix: int, boundary: str, align_prefix: bool,
                  device) -> torch.Tensor:
    """int32 ``(N, K)``: each student position's target position per foresight head, -1 for none, on ``device``
    (None: CPU). ``grid`` normalised and ``parsed`` offsets (``(raster, dy, dx)`` triples), already checked."""
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (seqlen, grid, prefix, parsed, boundary, bool(align_prefix), str(device))
    table = _CACHE.get(key)
    if table is None:
        table = _remember(key, _reference.pairing_table(seqlen, grid, prefix, parsed, boundary, align_prefix,
                                                        device=device))
    return table


def pair_counts(seqlen: int, grid: tuple[int, int], parsed, prefix: int, boundary: str,
                align_prefix: bool) -> list[int]:
    """Valid pairs per foresight head per sample, as host ints (no device read)."""
    key = ("counts", seqlen, grid, prefix, parsed, boundary, bool(align_prefix))
    counts = _CACHE.get(key)
    if counts is None:
        # From the plain-Python table: constants, also while torch.compile traces this.
        rows = _reference._pairing_list(seqlen, grid, prefix, parsed, boundary, bool(align_prefix))
        counts = _remember(key, [sum(1 for row in rows if row[k] >= 0) for k in range(len(parsed))])
    return counts


def clear() -> None:
    """Forget every kept table."""
    _CACHE.clear()
