"""Built-in offline data: a procedural, class-conditional image set in which global structure matters.

``shapes``: small images (default 8x8) over a fixed 8-colour palette, one token per pixel (see
``models/data/tokenizer.py``). Each class is a rule tying distant parts of the image together — mirror symmetry, stripes
that must keep alternating, a frame that must close — so a raster-order model that only looks back locally gets the
far half wrong. Every image is generated deterministically from ``(seed, index)``, and :func:`satisfies_rule` checks
whether any token grid obeys its class's rule (the structure metric of the evaluation study).

``digits`` (optional, needs scikit-learn): the 8x8 handwritten digits shipped inside scikit-learn, quantised to the
palette's grey levels.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

CLASS_NAMES = (
    "horizontal_stripes",  # rows alternate two colours
    "vertical_stripes",  # columns alternate two colours
    "checkerboard",  # two colours in a checkerboard
    "rectangle",  # one axis-aligned filled rectangle on a background
    "mirror_lr",  # random left half, right half its mirror image
    "mirror_tb",  # random top half, bottom half its mirror image
    "frame",  # a one-pixel border of one colour around another
    "cross",  # one full row and one full column of one colour on a background
    "diagonal",  # anti-diagonal stripes: colour depends on (row + col) mod 2, over 3 colours mod 3
    "halves",  # left half one colour, right half another
)
NUM_CLASSES = len(CLASS_NAMES)
PALETTE_SIZE = 8


def _two_colours(g: torch.Generator):
    a, b = torch.randperm(PALETTE_SIZE, generator=g)[:2].tolist()
    return a, b


def make_image(label: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """One (height, width) int64 token grid of class ``label``."""
    a, b = _two_colours(g)
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    name = CLASS_NAMES[label]
    if name == "horizontal_stripes":
        img = torch.where(rows % 2 == 0, a, b)
    elif name == "vertical_stripes":
        img = torch.where(cols % 2 == 0, a, b)
    elif name == "checkerboard":
        img = torch.where((rows + cols) % 2 == 0, a, b)
    elif name == "rectangle":
        r0 = int(torch.randint(0, height - 2, (1,), generator=g))
        c0 = int(torch.randint(0, width - 2, (1,), generator=g))
        r1 = int(torch.randint(r0 + 2, height + 1, (1,), generator=g))
        c1 = int(torch.randint(c0 + 2, width + 1, (1,), generator=g))
        if (r0, c0, r1, c1) == (0, 0, height, width):  # a rectangle must leave some background
            c1 -= 1
        img = torch.full((height, width), b)
        img[r0:r1, c0:c1] = a
    elif name == "mirror_lr":
        half = torch.randint(0, PALETTE_SIZE, (height, (width + 1) // 2), generator=g)
        img = torch.cat([half, half.flip(1)[:, width % 2:]], dim=1)
    elif name == "mirror_tb":
        half = torch.randint(0, PALETTE_SIZE, ((height + 1) // 2, width), generator=g)
        img = torch.cat([half, half.flip(0)[height % 2:]], dim=0)
    elif name == "frame":
        img = torch.full((height, width), b)
        img[0, :] = img[-1, :] = img[:, 0] = img[:, -1] = a
    elif name == "cross":
        r = int(torch.randint(0, height, (1,), generator=g))
        c = int(torch.randint(0, width, (1,), generator=g))
        img = torch.full((height, width), b)
        img[r, :] = a
        img[:, c] = a
    elif name == "diagonal":
        c3 = int(torch.randperm(PALETTE_SIZE, generator=g)[:3][-1])
        while c3 in (a, b):
            c3 = (c3 + 1) % PALETTE_SIZE
        img = torch.tensor([a, b, c3])[(rows + cols) % 3]
    elif name == "halves":
        img = torch.where(cols < width // 2, a, b)
    else:  # pragma: no cover - CLASS_NAMES and this chain are kept in sync
        raise AssertionError(name)
    return img.long()


def satisfies_rule(tokens: torch.Tensor, label: int) -> bool:
    """Whether a (height, width) token grid obeys the rule of class ``label`` (the colours are free)."""
    height, width = tokens.shape
    name = CLASS_NAMES[label]
    t = tokens
    distinct = lambda x, y: bool(x != y)  # noqa: E731
    if name in ("horizontal_stripes", "vertical_stripes"):
        t = t if name == "horizontal_stripes" else t.T
        if not bool((t == t[:, :1]).all()):
            return False
        col = t[:, 0]
        return bool((col[0::2] == col[0]).all()) and bool((col[1::2] == col[1]).all()) and distinct(col[0], col[1])
    if name == "checkerboard":
        parity = (torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2
        return bool((t[parity == 0] == t[0, 0]).all()) and bool((t[parity == 1] == t[0, 1]).all()) and distinct(
            t[0, 0], t[0, 1])
    if name == "mirror_lr":
        return bool((t == t.flip(1)).all())
    if name == "mirror_tb":
        return bool((t == t.flip(0)).all())
    if name == "halves":
        return bool((t[:, : width // 2] == t[0, 0]).all()) and bool((t[:, width // 2:] == t[0, -1]).all()) and distinct(
            t[0, 0], t[0, -1])
    if name == "frame":
        border = torch.zeros(height, width, dtype=torch.bool)
        border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
        inner = t[~border]
        return bool((t[border] == t[0, 0]).all()) and (inner.numel() == 0 or (
            bool((inner == inner[0]).all()) and distinct(inner[0], t[0, 0])))
    if name == "diagonal":
        phase = (torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 3
        colours = [t[phase == k] for k in range(3)]
        if not all(bool((c == c[0]).all()) for c in colours):
            return False
        return len({int(c[0]) for c in colours}) == 3
    values = t.unique()
    if name == "rectangle":
        if len(values) != 2:
            return False
        for colour in values:
            r, c = torch.nonzero(t == colour, as_tuple=True)
            box = t[r.min(): r.max() + 1, c.min(): c.max() + 1]
            if bool((box == colour).all()) and box.shape[0] >= 2 and box.shape[1] >= 2 and box.numel() < t.numel():
                return True
        return False
    if name == "cross":
        if len(values) != 2:
            return False
        for colour in values:
            full_rows = (t == colour).all(1).nonzero().flatten()
            full_cols = (t == colour).all(0).nonzero().flatten()
            if len(full_rows) == 1 and len(full_cols) == 1 and int((t == colour).sum()) == height + width - 1:
                return True
        return False
    raise AssertionError(name)  # pragma: no cover


class ShapesDataset(Dataset):
    """``len`` images of the built-in classes, balanced, deterministic in ``(seed, index)``.

    Item: ``(tokens (H*W,) int64 in [0, 8), label int)``; tokens in raster order."""

    def __init__(self, size: int = 4096, grid=(8, 8), seed: int = 0):
        self.size, self.seed = size, seed
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if self.height < 4 or self.width < 4:
            raise ValueError(f"shapes: grid must be at least 4x4, got {grid}")
        self.vocab_size, self.num_classes = PALETTE_SIZE, NUM_CLASSES

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = index % NUM_CLASSES
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return make_image(label, self.height, self.width, g).flatten(), label


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download), grey levels 0..16
    quantised to the 8-entry grey ramp of the palette. Needs the ``eval`` extra (scikit-learn)."""

    def __init__(self, split: str = "train", seed: int = 0):
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ImportError("the digits data needs scikit-learn: pip install -e '.[eval]'") from exc
        data = load_digits()
        images = torch.as_tensor(data.images).round().long().clamp(0, 16) * (PALETTE_SIZE - 1) // 16
        labels = torch.as_tensor(data.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = int(0.9 * len(order))
        keep = order[:cut] if split == "train" else order[cut:]
        self.tokens, self.labels = images[keep].flatten(1), labels[keep]
        self.height = self.width = 8
        self.vocab_size, self.num_classes = PALETTE_SIZE, 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.tokens[index], int(self.labels[index])


def build_dataset(name: str, *, size: int = 4096, grid=(8, 8), seed: int = 0, split: str = "train",
                  code_path: str | None = None, image_size: int = 256, features_dir: str | None = None):
    """``shapes`` (built in), ``digits`` (scikit-learn) or ``llamagen-codes`` (LlamaGen's pre-extracted ImageNet
    codes under ``code_path``, optionally with a per-crop Mirai-I feature cache; see :mod:`models.data.codes`).
    Held-out splits use another seed / the other part."""
    if name == "llamagen-codes":
        from .codes import LlamaGenCodes, code_dirs

        if not code_path:
            raise ValueError("llamagen-codes needs --code-path (the directory LlamaGen's extract_codes_c2i.py wrote)")
        return LlamaGenCodes(*code_dirs(code_path, image_size), crop="seeded", seed=seed, features_dir=features_dir)
    if name == "shapes":
        return ShapesDataset(size=size, grid=grid, seed=seed if split == "train" else seed + 7919)
    if name == "digits":
        return DigitsDataset(split=split, seed=seed)
    raise ValueError(f"unknown dataset {name!r}; built in: shapes, digits (needs scikit-learn), llamagen-codes")
