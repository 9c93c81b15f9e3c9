"""Offline Mirai-I feature cache for LlamaGen code files: the frozen encoder's patch features of every crop.

LlamaGen's ``extract_codes_c2i.py`` stores, for image ``i`` of its dataset, the VQ codes of ``A`` augmentations
of that image (:mod:`models.data.codes`): with ``--ten-crop`` the ten crops (``TenCrop(image_size)``: corners tl, tr,
bl, br, centre, then the same five of the horizontally flipped image) of a ``int(image_size * crop_range)`` px ADM
centre crop; without it the ``image_size`` px ADM centre crop and its horizontal flip. Code files hold no pixels,
so this CLI recomputes the same crops from the images, runs the encoder on each and writes
``<out>/{i}.npy`` float16 ``(A, H*W, Z)`` in the same crop order (the layout :class:`models.data.codes.LlamaGenCodes`
reads with ``features_dir``)::

    python -m models.extract_features --encoder dinov2_vitb14_pretrain.pth --arch vitb14 \\
        --images-dir /data/imagenet/train --codes-dir /codes/imagenet256_codes --out /codes/imagenet256_dinov2

Images: ``--images-dir`` is either a flat folder of image files (sorted by name) or an ImageFolder tree (one
sub-folder per class, torchvision's order: classes sorted, files sorted), the order LlamaGen's extraction walked,
so feature file ``i`` belongs to code file ``i``. PNG/JPEG need Pillow; ``.npy`` files holding ``uint8 (H, W, 3)``
arrays are read without it. With ``--codes-dir`` the crop count (10: ten-crop, 2: flip, 1: centre only), the
number of files and the code grid are taken from the code files, and ``--labels-dir`` (default: the sibling
``*_labels`` folder, if present) is checked against the ImageFolder classes. Code files numbered past the image
count (DistributedSampler pads with the first images) map to image ``i % n``.

Encoder preparation (``--prep``): ``mirai`` (default) as the official Mirai-I script prepares DINOv2 — the position
table resampled once to the code grid with size-based, antialiased bicubic (timm's ``resample_abs_pos_embed``
semantics, :meth:`models.nets.dinov2.DinoV2.resample_pos_embed_`) and each crop (LlamaGen's [-1, 1] tensor) resized to
``grid * patch`` px (224 for 16x16 codes and patch 14) with plain bicubic, no antialiasing, no clamp, then
ImageNet-normalised (:func:`models.nets.dinov2.imagenet_preprocess`); ``ours`` keeps our earlier preparation (DINOv2's
scale-factor interpolation of the table at every forward, antialiased and clamped resize).

Storage: features are computed in fp32 (``--dtype``: autocast on GPU only) and stored as float16, half the disk
(ImageNet ten-crop, ViT-B: 1.28 M x 10 x 256 x 768 x 2 bytes = 5.0 TB instead of 10). The fp16 rounding (relative
2^-11 per element) moves the cosine targets negligibly: on DINOv2-B-shaped LayerNorm-ed features (768 channels,
8 of them 30x larger) 1 - cos(fp32, fp16) is 7e-8 on average (max 5e-7) per patch, and the cosine loss against a
fixed prediction changes by 1.4e-7 of its value (``tests/test_recipe.py::test_fp16_feature_cache_barely_moves_
cosine_targets``; on a randomly initialised ViT-B/14's features: max 1.8e-7).

Resampling: with Pillow the ADM centre crop runs in Pillow (BOX halving, BICUBIC resize) as LlamaGen does; the
tensor path (``.npy`` images without Pillow) uses the same crop geometry with torch's area / anti-aliased bicubic
resampling, so pixel values may differ by a few levels where the image had to be resized.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .data.codes import codes_layout
from .nets.dinov2 import DinoV2, imagenet_preprocess

__all__ = ["list_images", "load_image", "center_crop_arr", "five_crop", "ten_crop", "llamagen_crops",
           "crop_features", "encode_crops", "extract", "prepare_encoder", "PREPS", "main"]

# --prep: how DINOv2 is prepared for Mirai-I -> the resize of imagenet_preprocess (see the module docstring)
PREPS = {"mirai": "bicubic", "ours": "antialias"}


def prepare_encoder(encoder: DinoV2, grid: int, prep: str = "mirai") -> DinoV2:
    """``prep="mirai"``: resample the position table once to ``grid x grid`` (the official Mirai-I preparation);
    ``"ours"``: leave it (DINOv2 interpolates it at every forward). Returns the encoder."""
    if prep not in PREPS:
        raise ValueError(f"extract_features: --prep must be one of {sorted(PREPS)}, got {prep!r}")
    if prep == "mirai":
        encoder.resample_pos_embed_(grid)
    return encoder

# torchvision's ImageFolder extensions (lower-cased match), plus .npy for machines without Pillow.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NPY = ".npy"


def _pil():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS + (NPY,))


def list_images(images_dir: str) -> Tuple[List[str], Optional[List[int]]]:
    """Image paths in LlamaGen's dataset order, and the class index of each (``None`` for a flat folder).

    A folder with sub-folders is an ImageFolder tree: classes are the sorted sub-folder names; inside each,
    ``os.walk`` in sorted order, files sorted. Otherwise the folder's image files sorted by name.
    """
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"extract_features: images directory not found: {images_dir!r}")
    classes = sorted(e.name for e in os.scandir(images_dir) if e.is_dir())
    if classes:
        paths, labels = [], []
        for label, cls in enumerate(classes):
            for root, _, names in sorted(os.walk(os.path.join(images_dir, cls), followlinks=True)):
                for name in sorted(names):
                    if _is_image(name):
                        paths.append(os.path.join(root, name))
                        labels.append(label)
        found: Tuple[List[str], Optional[List[int]]] = (paths, labels)
    else:
        found = (sorted(os.path.join(images_dir, n) for n in os.listdir(images_dir) if _is_image(n)), None)
    if not found[0]:
        raise ValueError(f"extract_features: no image files ({', '.join(IMG_EXTENSIONS + (NPY,))}) in {images_dir!r}")
    return found


def load_image(path: str):
    """A PIL RGB image (when Pillow is installed and the file is not ``.npy``) or a ``uint8 (3, H, W)`` tensor."""
    if path.lower().endswith(NPY):
        try:
            arr = np.load(path)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"extract_features: unreadable .npy image {path!r}: {exc}") from exc
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"extract_features: {path!r} must hold a uint8 (H, W, 3) RGB array, "
                             f"got {arr.dtype} {arr.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    Image = _pil()
    if Image is None:
        raise ImportError(f"extract_features: reading {os.path.basename(path)!r} needs Pillow (pip install pillow); "
                          f"without it, provide the images as uint8 (H, W, 3) .npy arrays")
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as exc:
        raise ValueError(f"extract_features: unreadable image {path!r}: {exc}") from exc


def _to_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def center_crop_arr(image, size: int) -> torch.Tensor:
    """ADM's centre crop (LlamaGen's ``center_crop_arr``): halve with a box filter while the short side is at least
    ``2 * size``, resize bicubically so the short side is ``size`` (the long side rounded), then cut the central
    ``size x size`` square (offsets rounded down). ``image``: PIL image or ``uint8 (3, H, W)`` tensor; returns
    ``uint8 (3, size, size)``."""
    if not isinstance(image, torch.Tensor):  # PIL: the exact LlamaGen resampling
        Image = _pil()
        while min(image.size) >= 2 * size:
            image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
        scale = size / min(image.size)
        image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
        x = _to_tensor(image)
    else:
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"center_crop_arr: expected a uint8 (3, H, W) tensor, got {image.dtype} "
                             f"{tuple(image.shape)}")
        x = image.float()[None]
        while min(x.shape[-2:]) >= 2 * size:
            x = F.adaptive_avg_pool2d(x, (x.shape[-2] // 2, x.shape[-1] // 2)).round()
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        new = (round(h * scale), round(w * scale))
        if new != (h, w):
            x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)[0]
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top:top + size, left:left + size].contiguous()


def five_crop(x: torch.Tensor, size: int) -> List[torch.Tensor]:
    """torchvision ``five_crop`` on ``(..., H, W)``: top-left, top-right, bottom-left, bottom-right, centre (centre
    offsets ``round((H - size) / 2)``, Python's round-half-to-even, as torchvision)."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"five_crop: crop {size} larger than the image {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [x[..., r:r + size, c:c + size] for r, c in corners]


def ten_crop(x: torch.Tensor, size: int) -> List[torch.Tensor]:
    """torchvision ``TenCrop(size)``: the five crops, then the five crops of the horizontally flipped image."""
    return five_crop(x, size) + five_crop(x.flip(-1), size)


def llamagen_crops(image, image_size: int = 256, num_crops: int = 10, crop_range: float = 1.1) -> torch.Tensor:
    """The crops LlamaGen's ``extract_codes_c2i.py`` encodes for one image, in its order, as its model input:
    ``(A, 3, image_size, image_size)`` fp32 in [-1, 1].

    ``num_crops``: 10 (``--ten-crop``: ``TenCrop`` of the ``int(image_size * crop_range)`` px centre crop),
    2 (the ``image_size`` px centre crop and its horizontal flip) or 1 (the centre crop alone).
    """
    if num_crops == 10:
        crops = ten_crop(center_crop_arr(image, int(image_size * crop_range)), image_size)
    elif num_crops in (1, 2):
        x = center_crop_arr(image, image_size)
        crops = [x, x.flip(-1)][:num_crops]
    else:
        raise ValueError(f"llamagen_crops: LlamaGen stores 10 (ten-crop) or 2 (flip) crops per image "
                         f"(or 1), got num_crops={num_crops}")
    return torch.stack(crops).float() / 127.5 - 1.0  # ToTensor + Normalize(0.5, 0.5)


@torch.no_grad()
def encode_crops(encoder: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor, *, encoder_size: int = 224,
                 batch_size: int = 10, device="cpu", dtype: torch.dtype = torch.float32,
                 resize: str = "bicubic") -> torch.Tensor:
    """``crops (C, 3, S, S)`` in [-1, 1] -> ``(C, N, Z)`` fp32 features on the CPU, ``batch_size`` crops per call;
    resizing (``resize``: see :func:`models.nets.dinov2.imagenet_preprocess`) and ImageNet normalisation run on
    ``device``. ``dtype``: autocast dtype on CUDA (CPU: fp32)."""
    out = []
    for chunk in crops.split(batch_size):
        x = imagenet_preprocess(chunk.to(device, non_blocking=True), encoder_size, resize=resize)
        if dtype != torch.float32 and torch.device(device).type == "cuda":
            with torch.autocast("cuda", dtype=dtype):
                out.append(encoder(x).float().cpu())
        else:
            out.append(encoder(x).float().cpu())
    return torch.cat(out)


def crop_features(encoder: Callable[[torch.Tensor], torch.Tensor], image, *, image_size: int = 256,
                  num_crops: int = 10, crop_range: float = 1.1, encoder_size: int = 224, batch_size: int = 10,
                  device="cpu", dtype: torch.dtype = torch.float32, resize: str = "bicubic") -> torch.Tensor:
    """``(A, N, Z)`` encoder features of the crops of one image (:func:`llamagen_crops` order). ``encoder`` maps
    ImageNet-normalised ``(B, 3, encoder_size, encoder_size)`` images to ``(B, N, Z)``."""
    crops = llamagen_crops(image, image_size, num_crops, crop_range)
    return encode_crops(encoder, crops, encoder_size=encoder_size, batch_size=batch_size, device=device, dtype=dtype,
                        resize=resize)


def _as_list(items):
    return items


class _CropSet(torch.utils.data.Dataset):
    """File index -> (index, its image's crops); runs in DataLoader workers so decoding and cropping overlap the
    encoder."""

    def __init__(self, images, indices, image_size, num_crops, crop_range):
        self.images, self.indices = list(images), list(indices)
        self.args = (image_size, num_crops, crop_range)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        return i, llamagen_crops(load_image(self.images[i % len(self.images)]), *self.args)


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def extract(encoder: Callable[[torch.Tensor], torch.Tensor], images: Sequence[str], out_dir: str, *,
            count: Optional[int] = None, start: int = 0, image_size: int = 256, num_crops: int = 10,
            crop_range: float = 1.1, encoder_size: int = 224, expected_tokens: Optional[int] = None,
            labels: Optional[Sequence[int]] = None, labels_dir: Optional[str] = None, batch_size: int = 10,
            images_per_step: int = 1, num_workers: int = 0, device="cpu", dtype: torch.dtype = torch.float32,
            overwrite: bool = False, progress: bool = True, resize: str = "bicubic") -> int:
    """Write ``out_dir/{i}.npy`` (float16 ``(A, N, Z)``) for ``i`` in ``[start, count)``, image ``i % len(images)``;
    existing files are kept unless ``overwrite``. ``images_per_step`` images are cropped (by ``num_workers``
    DataLoader workers) and encoded together, ``batch_size`` crops per encoder call. Returns the files written."""
    n_img = len(images)
    count = n_img if count is None else count
    os.makedirs(out_dir, exist_ok=True)
    todo = []
    for i in range(start, count):
        if labels is not None and labels_dir is not None:
            lpath = os.path.join(labels_dir, f"{i}.npy")
            if os.path.isfile(lpath):
                stored = int(np.asarray(np.load(lpath)).reshape(-1)[0])
                if stored != labels[i % n_img]:
                    raise ValueError(f"extract_features: label file {lpath!r} says class {stored} but image "
                                     f"{images[i % n_img]!r} is class {labels[i % n_img]}: the images are not in "
                                     f"the order the codes were extracted from")
        if overwrite or not os.path.exists(os.path.join(out_dir, f"{i}.npy")):
            todo.append(i)
    loader = torch.utils.data.DataLoader(_CropSet(images, todo, image_size, num_crops, crop_range),
                                         batch_size=images_per_step, num_workers=num_workers,
                                         collate_fn=_as_list)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="features", unit="img")
        except ImportError:
            pass
    written = 0
    for items in loader:
        feats = encode_crops(encoder, torch.cat([crops for _, crops in items]), encoder_size=encoder_size,
                             batch_size=batch_size, device=device, dtype=dtype, resize=resize)
        if expected_tokens is not None and feats.shape[1] != expected_tokens:
            raise ValueError(f"extract_features: the encoder gives {feats.shape[1]} patches per crop but the codes "
                             f"have {expected_tokens} per crop; set --encoder-size so the patch grid matches")
        for (i, crops), f in zip(items, feats.split([len(c) for _, c in items])):
            _save_atomic(os.path.join(out_dir, f"{i}.npy"), f.to(torch.float16).numpy())
            written += 1
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.extract_features", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", required=True, help="local DINOv2 state_dict (e.g. dinov2_vitb14_pretrain.pth)")
    p.add_argument("--arch", default="vitb14", help="vits14 vitb14 vitl14 vitg14, optionally with _reg")
    p.add_argument("--images-dir", required=True, help="flat folder of images (sorted) or an ImageFolder tree")
    p.add_argument("--out", required=True, help="features folder to write ({i}.npy, float16 (A, H*W, Z))")
    p.add_argument("--codes-dir", default=None, help="LlamaGen *_codes folder: crop count, file count and grid")
    p.add_argument("--labels-dir", default=None, help="LlamaGen *_labels folder to check the image order against "
                   "(default: the codes folder's *_labels sibling, when there is one and the images are an ImageFolder)")
    p.add_argument("--image-size", type=int, default=256, help="LlamaGen --image-size")
    p.add_argument("--ten-crop", action="store_true", help="LlamaGen --ten-crop (without --codes-dir)")
    p.add_argument("--crop-range", type=float, default=1.1, help="LlamaGen --crop-range")
    p.add_argument("--downsample", type=int, default=16, help="VQ downsampling factor (codes grid = size / this)")
    p.add_argument("--encoder-size", type=int, default=None,
                   help="encoder input size (default: codes grid x patch size, 224 for 16x16 codes)")
    p.add_argument("--start", type=int, default=0, help="first file index (to split the work)")
    p.add_argument("--count", type=int, default=None, help="stop before this file index (default: all)")
    p.add_argument("--batch-size", type=int, default=10, help="crops per encoder call")
    p.add_argument("--images-per-step", type=int, default=1, help="images cropped and encoded together")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding and cropping images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype on GPU")
    p.add_argument("--prep", default="mirai", choices=sorted(PREPS), help="mirai: DINOv2 prepared as the official "
                   "Mirai-I (position table resampled once, antialiased; plain bicubic resize, no clamp); ours: "
                   "DINOv2's per-forward interpolation, antialiased + clamped resize")
    p.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    images, labels = list_images(args.images_dir)
    grid = args.image_size // args.downsample
    num_crops = 10 if args.ten_crop else 2
    count, expected_tokens, labels_dir = len(images), None, args.labels_dir
    if args.codes_dir:
        count, num_crops, expected_tokens = codes_layout(args.codes_dir)
        side = int(round(expected_tokens ** 0.5))
        if side * side != expected_tokens:
            raise ValueError(f"extract_features: {expected_tokens} codes per crop is not a square grid")
        grid = side
        if labels_dir is None and args.codes_dir.rstrip("/").endswith("_codes"):
            sibling = args.codes_dir.rstrip("/")[: -len("_codes")] + "_labels"
            labels_dir = sibling if os.path.isdir(sibling) else None
        if count > 2 * len(images):
            raise ValueError(f"extract_features: {count} code files but only {len(images)} images in "
                             f"{args.images_dir!r}: wrong images folder?")
    if args.count is not None:
        count = min(count, args.count)
    device = torch.device(args.device)
    encoder = DinoV2.from_checkpoint(args.encoder, args.arch).to(device)
    encoder_size = args.encoder_size or grid * encoder.patch_size
    if encoder_size % encoder.patch_size:
        raise ValueError(f"extract_features: --encoder-size {encoder_size} is not a multiple of the patch size "
                         f"{encoder.patch_size}")
    prepare_encoder(encoder, encoder_size // encoder.patch_size, args.prep)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    n = extract(encoder, images, args.out, count=count, start=args.start, image_size=args.image_size,
                num_crops=num_crops, crop_range=args.crop_range, encoder_size=encoder_size,
                expected_tokens=expected_tokens if expected_tokens is not None else grid * grid,
                labels=labels, labels_dir=labels_dir, batch_size=args.batch_size,
                images_per_step=args.images_per_step, num_workers=args.num_workers, device=device, dtype=dtype,
                overwrite=args.overwrite, resize=PREPS[args.prep])
    print(f"wrote {n} feature files ({num_crops} crops, {encoder_size} px, dim {encoder.out_dim}) to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, ImportError) as exc:  # user errors: the message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
