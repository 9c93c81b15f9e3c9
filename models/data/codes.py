"""LlamaGen pre-extracted ImageNet codes (``autoregressive/train/extract_codes_c2i.py``) as a training dataset.

Layout on disk (what LlamaGen's extraction writes, one pair of files per image ``i = 0 .. n-1``)::

    <root>/imagenet256_codes/{i}.npy    int64 (1, A, H*W): the VQ codes of A augmentations of image i
                                        (A = 10 with --ten-crop: the ten crops of a 1.1x centre crop;
                                         A = 2 without: the image and its horizontal flip)
    <root>/imagenet256_labels/{i}.npy   int64 (1,): the class in [0, 1000)

``(A, H*W)`` and ``(H*W,)`` code files (``A = 1``) are read too. Each item picks one augmentation: at random
(``crop="random"``, the global torch RNG, which DataLoader seeds per worker — LlamaGen's behaviour), reproducibly
from ``(seed, epoch, index)`` (``crop="seeded"``; call :meth:`LlamaGenCodes.set_epoch`), or always the same one
(``crop=k``).

Optional Mirai-I feature cache. Code files hold no pixels, so the frozen encoder's features (DINOv2 or any other
(B, N, Z) encoder) must be computed offline from the *same* crops the codes were extracted from, in the same order::

    <features_dir>/{i}.npy              float16 or float32 (A, H*W, Z): crop a's patch features, row-major over
                                        the H x W grid (feature j belongs to code j), optionally with a leading 1

When ``features_dir`` is given, items are ``(tokens, label, features (H*W, Z))`` with the features of the crop the
tokens came from (kept in their stored dtype; the file is memory-mapped so only that crop is read).
:func:`write_item` writes one image's files in this layout (for extraction scripts and tests).
"""

from __future__ import annotations

import os
import re
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["LlamaGenCodes", "write_item", "code_dirs", "codes_layout"]

_NAME = re.compile(r"^(\d+)\.npy$")


def code_dirs(code_path: str, image_size: int = 256, dataset: str = "imagenet") -> Tuple[str, str]:
    """The codes and labels directories LlamaGen's extraction creates under ``--code-path``."""
    return (os.path.join(code_path, f"{dataset}{image_size}_codes"),
            os.path.join(code_path, f"{dataset}{image_size}_labels"))


def _count(directory: str, what: str) -> int:
    """Number of files ``0.npy .. n-1.npy`` in ``directory``; an error if the numbering has gaps."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"LlamaGen codes: {what} directory not found: {directory!r}")
    ids = sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m)
    if not ids:
        raise ValueError(f"LlamaGen codes: no {{i}}.npy files in the {what} directory {directory!r}")
    if ids[-1] != len(ids) - 1:
        missing = sorted(set(range(ids[-1] + 1)) - set(ids))
        raise ValueError(f"LlamaGen codes: {what} files in {directory!r} are not numbered 0..n-1 without gaps "
                         f"({len(ids)} files, highest {ids[-1]}; missing e.g. {missing[:5]})")
    return len(ids)


def _load(path: str, **kwargs) -> np.ndarray:
    try:
        return np.load(path, **kwargs)
    except FileNotFoundError:
        raise FileNotFoundError(f"LlamaGen codes: missing file {path!r}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"LlamaGen codes: unreadable .npy file {path!r}: {exc}") from exc


def _as_crops(codes: np.ndarray, path: str) -> np.ndarray:
    """(1, A, N) / (A, N) / (N,) -> (A, N)."""
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes[0]
    elif codes.ndim == 1:
        codes = codes[None]
    if codes.ndim != 2:
        raise ValueError(f"LlamaGen codes: {path!r} has shape {codes.shape}; expected (1, crops, H*W), "
                         f"(crops, H*W) or (H*W,)")
    return codes


def codes_layout(codes_dir: str) -> Tuple[int, int, int]:
    """(number of code files, crops per file, codes per crop) of a LlamaGen codes folder, read from its file count
    and ``0.npy`` (what a per-crop feature cache for it must match)."""
    n = _count(codes_dir, "codes")
    path = os.path.join(codes_dir, "0.npy")
    crops = _as_crops(_load(path), path)
    return n, crops.shape[0], crops.shape[1]


class LlamaGenCodes(Dataset):
    """LlamaGen ``extract_codes_c2i.py`` output as a class-conditional token dataset.

    Items: ``(tokens (H*W,) int64, label int)``, plus ``features (H*W, Z)`` when ``features_dir`` is given; the
    same interface as :mod:`models.data.shapes`'s datasets (``height``, ``width``, ``vocab_size``, ``num_classes``).

    Args:
        codes_dir, labels_dir: the two directories (see :func:`code_dirs`).
        grid: the code grid ``(H, W)``; default: square, from the first code file (16x16 for 256px VQ-16 codes).
        crop: ``"random"``, ``"seeded"`` or a fixed augmentation index.
        features_dir: optional per-crop Mirai-I feature cache (module docstring).
        size: use only the first ``size`` images (default: all files).
    """

    def __init__(self, codes_dir: str, labels_dir: str, *, grid=None, crop: Union[str, int] = "random",
                 seed: int = 0, features_dir: Optional[str] = None, size: Optional[int] = None,
                 vocab_size: int = 16384, num_classes: int = 1000):
        self.codes_dir, self.labels_dir, self.features_dir = codes_dir, labels_dir, features_dir
        n_codes, n_labels = _count(codes_dir, "codes"), _count(labels_dir, "labels")
        if n_codes != n_labels:
            raise ValueError(f"LlamaGen codes: {n_codes} code files in {codes_dir!r} but {n_labels} label files "
                             f"in {labels_dir!r}; they must pair up one to one")
        if features_dir is not None:
            n_feats = _count(features_dir, "features")
            if n_feats != n_codes:
                raise ValueError(f"LlamaGen codes: {n_feats} feature files in {features_dir!r} but {n_codes} code "
                                 f"files; compute the features for every image (per crop) first")
        if size is not None and not 0 < size <= n_codes:
            raise ValueError(f"LlamaGen codes: size={size} but there are {n_codes} images")
        self.size = n_codes if size is None else size
        if not (crop in ("random", "seeded") or (isinstance(crop, int) and not isinstance(crop, bool) and crop >= 0)):
            raise ValueError(f"LlamaGen codes: crop must be 'random', 'seeded' or an index >= 0, got {crop!r}")
        self.crop, self.seed, self.epoch = crop, seed, 0
        self.vocab_size, self.num_classes = vocab_size, num_classes

        first = _as_crops(_load(self._path(codes_dir, 0)), self._path(codes_dir, 0))
        self.num_crops, n = first.shape
        if grid is None:
            side = int(round(n ** 0.5))
            if side * side != n:
                raise ValueError(f"LlamaGen codes: {n} codes per image is not a square grid; pass grid=(H, W)")
            grid = (side, side)
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if self.height * self.width != n:
            raise ValueError(f"LlamaGen codes: grid {self.height}x{self.width} != {n} codes per image")
        if isinstance(crop, int) and crop >= self.num_crops:
            raise ValueError(f"LlamaGen codes: crop={crop} but the files hold {self.num_crops} crops")

    @staticmethod
    def _path(directory: str, index: int) -> str:
        return os.path.join(directory, f"{index}.npy")

    def set_epoch(self, epoch: int) -> None:
        """Change the ``crop="seeded"`` choice per epoch (like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def _pick(self, index: int, num_crops: int) -> int:
        if isinstance(self.crop, int):
            return self.crop
        if self.crop == "random":
            return int(torch.randint(num_crops, (1,)))
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        return int(torch.randint(num_crops, (1,), generator=g))

    def __getitem__(self, index: int):
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        index %= self.size
        path = self._path(self.codes_dir, index)
        crops = _as_crops(_load(path), path)
        n = self.height * self.width
        if crops.shape[1] != n:
            raise ValueError(f"LlamaGen codes: {path!r} holds {crops.shape[1]} codes per crop, expected {n} "
                             f"({self.height}x{self.width})")
        k = self._pick(index, crops.shape[0])
        if k >= crops.shape[0]:
            raise ValueError(f"LlamaGen codes: crop {k} requested but {path!r} holds {crops.shape[0]} crops")
        tokens = torch.from_numpy(np.ascontiguousarray(crops[k])).long()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"LlamaGen codes: {path!r} has codes outside [0, {self.vocab_size})")

        lpath = self._path(self.labels_dir, index)
        label_arr = np.asarray(_load(lpath)).reshape(-1)
        if label_arr.size != 1:
            raise ValueError(f"LlamaGen codes: {lpath!r} should hold one label, holds {label_arr.size}")
        label = int(label_arr[0])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"LlamaGen codes: {lpath!r} has label {label} outside [0, {self.num_classes})")
        if self.features_dir is None:
            return tokens, label

        fpath = self._path(self.features_dir, index)
        feats = _load(fpath, mmap_mode="r")  # (A, N, Z): read only the chosen crop
        if feats.ndim == 4 and feats.shape[0] == 1:
            feats = feats[0]
        if feats.ndim != 3 or feats.shape[0] != crops.shape[0] or feats.shape[1] != n:
            raise ValueError(f"LlamaGen codes: feature file {fpath!r} has shape {feats.shape}; expected "
                             f"({crops.shape[0]}, {n}, Z), one (H*W, Z) block per crop of the code file")
        if feats.dtype not in (np.float16, np.float32):
            raise ValueError(f"LlamaGen codes: feature file {fpath!r} must be float16 or float32, got {feats.dtype}")
        return tokens, label, torch.from_numpy(np.array(feats[k]))


def write_item(index: int, codes_dir: str, labels_dir: str, codes, label: int, *, features_dir: Optional[str] = None,
               features=None) -> None:
    """Write image ``index`` in LlamaGen's layout: ``codes`` (A, H*W) -> int64 (1, A, H*W); ``label`` -> int64
    (1,); ``features`` (A, H*W, Z) stored as given (float16 recommended) under ``features_dir``."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"write_item: codes must be (crops, H*W), got {codes.shape}")
    for d in (codes_dir, labels_dir):
        os.makedirs(d, exist_ok=True)
    np.save(os.path.join(codes_dir, f"{index}.npy"), codes[None])
    np.save(os.path.join(labels_dir, f"{index}.npy"), np.array([label], dtype=np.int64))
    if features is not None:
        if features_dir is None:
            raise ValueError("write_item: features given without features_dir")
        feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if feats.ndim != 3 or feats.shape[:2] != codes.shape:
            raise ValueError(f"write_item: features must be (crops, H*W, Z) matching codes {codes.shape}, "
                             f"got {feats.shape}")
        os.makedirs(features_dir, exist_ok=True)
        np.save(os.path.join(features_dir, f"{index}.npy"), feats)
