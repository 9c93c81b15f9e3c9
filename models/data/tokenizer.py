"""Tokenizers: token grids <-> images, and PNG writing with the standard library only.

:class:`PaletteTokenizer` is the built-in, exactly invertible tokenizer for small images: one token per pixel, the
token is the index of the nearest colour of a fixed palette. It decodes samples of the built-in data to pictures.
"""

from __future__ import annotations

import struct
import zlib

import torch

# 8 colours: the first is black, the last white, a grey ramp would be indices 0..7 for the digits data, so the
# palette doubles as one: colours are ordered by luminance.
DEFAULT_PALETTE = torch.tensor(
    [
        [0, 0, 0],
        [128, 0, 128],
        [200, 30, 30],
        [30, 130, 30],
        [40, 90, 220],
        [230, 140, 20],
        [80, 210, 220],
        [255, 255, 255],
    ],
    dtype=torch.uint8,
)


class PaletteTokenizer:
    """Pixel <-> token via a fixed palette ``(V, 3)`` uint8. ``encode(images (B, H, W, 3) uint8) -> (B, H*W)``
    int64 (nearest colour); ``decode(tokens (B, H*W), grid) -> (B, H, W, 3)`` uint8."""

    def __init__(self, palette: torch.Tensor = DEFAULT_PALETTE):
        self.palette = palette.to(torch.uint8)
        self.vocab_size = len(palette)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dist = (images[..., None, :].float() - self.palette.float()).square().sum(-1)
        return dist.argmin(-1).flatten(1)

    def decode(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        height, width = (grid, grid) if isinstance(grid, int) else grid
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"tokens must lie in [0, {self.vocab_size})")
        return self.palette[tokens.long().cpu()].reshape(tokens.shape[0], height, width, 3)


def image_grid(images: torch.Tensor, ncols: int = 8, pad: int = 1, scale: int = 1) -> torch.Tensor:
    """Tile (N, H, W, 3) uint8 images into one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) image, each pixel
    repeated ``scale`` times (small images are unreadable at 1:1)."""
    if scale > 1:
        images = images.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    n, height, width, _ = images.shape
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    canvas = torch.full((nrows * (height + pad) + pad, ncols * (width + pad) + pad, 3), 96, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (height + pad), pad + c * (width + pad)
        canvas[y: y + height, x: x + width] = images[i]
    return canvas


def write_png(path: str, image: torch.Tensor) -> None:
    """Write an (H, W, 3) uint8 image as an 8-bit RGB PNG (no imaging library needed)."""
    image = image.to(torch.uint8).cpu().contiguous()
    height, width, channels = image.shape
    if channels != 3:
        raise ValueError(f"write_png: expected (H, W, 3), got {tuple(image.shape)}")
    raw = b"".join(b"\x00" + image[y].numpy().tobytes() for y in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
