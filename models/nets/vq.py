"""LlamaGen's VQ image tokenizer (VQ-16: downsample 16, codebook 16384 x 8, l2-normalised lookup), inference only.

The module tree mirrors LlamaGen's ``tokenizer/tokenizer_image/vq_model.py`` parameter for parameter (names, shapes,
the ``quantize.codebook_used`` buffer included), so LlamaGen's released ``vq_ds16_c2i.pt`` — a dict whose weights sit
under ``"model"`` — loads with ``strict=True``::

    tok = VQTokenizer.from_checkpoint("vq_ds16_c2i.pt")      # nothing is downloaded
    codes = tok.encode(images)                                # (B, 3, 256, 256) in [-1, 1] -> (B, 256) int64
    images = tok.decode(codes, grid=(16, 16))                 # -> (B, 3, 256, 256) in [-1, 1]

Layout of the weights (``ch`` = 128, ``ch_mult`` = (1, 1, 2, 2, 4) for VQ-16, GroupNorm(32) everywhere):
``encoder.conv_in``, ``encoder.conv_blocks.{level}.res.{0,1}`` (ResnetBlock: norm1, conv1, norm2, conv2, and
``nin_shortcut`` when the width changes), ``encoder.conv_blocks.{last}.attn.{0,1}`` (norm, q, k, v, proj_out: 1x1
convs), ``encoder.conv_blocks.{level}.downsample.conv`` (all but the last level), ``encoder.mid.{0,1,2}``
(res, attn, res), ``encoder.norm_out``, ``encoder.conv_out`` (-> ``z_channels``); ``quant_conv`` (z -> 8),
``quantize.embedding`` (16384 x 8), ``post_quant_conv`` (8 -> z); the decoder mirrors the encoder with its levels
in reverse order (``decoder.conv_blocks.0`` is the coarsest), three res blocks per level and ``upsample.conv``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import LLAMAGEN_TYPES, CheckpointError, UnsafeCheckpointError, load_checkpoint

__all__ = ["VQConfig", "VQTokenizer", "VQ_16", "VQ_8", "VQ_PRESETS"]


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128  # base width; LlamaGen fixes it at 128 (smaller only for tests)
    ch_mult: Tuple[int, ...] = field(default=(1, 1, 2, 2, 4))
    z_channels: int = 256
    num_res_blocks: int = 2
    codebook_usage_len: int = 65536  # length of LlamaGen's ``codebook_used`` buffer (training statistics only)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQ_PRESETS: Dict[str, VQConfig] = {
    "VQ-16": VQConfig(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": VQConfig(ch_mult=(1, 2, 2, 4)),
}


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))  # LlamaGen's dropout here is p=0 at inference
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class _Attn(nn.Module):
    """Single-head self-attention over the spatial positions, 1x1 convs for q/k/v/out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # (B, 1, HW, C): one head of width C, so SDPA's default 1/sqrt(C) scale is the original's
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # stride-2 3x3 conv on an input padded by one row/column at the bottom/right only: exactly halves even sizes
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int) -> nn.ModuleList:
    return nn.ModuleList([_Res(channels, channels), _Attn(channels), _Res(channels, channels)])


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    has_attn = len(level.attn) > 0
    for i, res in enumerate(level.res):
        h = res(h)
        if has_attn:
            h = level.attn[i](h)
    return h


class _Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        width = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.res.append(_Res(width, ch * m))
                width = ch * m
                if i == len(mult) - 1:  # attention only at the coarsest resolution
                    level.attn.append(_Attn(width))
            if i != len(mult) - 1:
                level.downsample = _Down(width)
            self.conv_blocks.append(level)
        self.mid = _mid(width)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = _mid(width)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(_Res(width, ch * mult[i]))
                width = ch * mult[i]
                if i == len(mult) - 1:
                    level.attn.append(_Attn(width))
            if i != 0:
                level.upsample = _Up(width)
            self.conv_blocks.append(level)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _Quantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # LlamaGen keeps a rolling window of recently used codes (a persistent buffer, hence in every checkpoint);
        # kept only so checkpoints load strictly, never read here.
        self.register_buffer("codebook_used", torch.zeros(cfg.codebook_usage_len))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)


def _unwrap_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise ValueError(f"VQ checkpoint {path!r}: expected a dict (LlamaGen stores weights under 'model'), "
                         f"got {type(obj).__name__}")
    for key in ("model", "state_dict", "ema"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    # checkpoints saved from DDP / torch.compile wrappers carry a prefix on every key
    for prefix in ("module.", "_orig_mod."):
        if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    if not any(isinstance(k, str) and k.startswith(("encoder.", "decoder.", "quantize.")) for k in obj):
        raise ValueError(f"VQ checkpoint {path!r}: no 'model' entry and no VQ weights at the top level; "
                         f"top-level keys: {sorted(map(str, obj))[:10]}")
    return obj


class VQTokenizer(nn.Module):
    """LlamaGen VQ tokenizer (inference): images in [-1, 1] <-> code grids.

    ``encode(images (B, 3, H, W) float in [-1, 1], H and W multiples of the downsample factor) -> (B, H/d * W/d)``
    int64 codes in raster order (row-major over the latent grid, as LlamaGen's extracted codes);
    ``decode(codes (B, h*w) int, grid=(h, w)) -> (B, 3, h*d, w*d)`` float in [-1, 1].
    Runs on the module's device and dtype (move it with ``.to``); always in eval mode, without autograd."""

    def __init__(self, config: Optional[VQConfig] = None):
        super().__init__()
        self.config = cfg = config or VQConfig()
        for m in (cfg.ch, *(cfg.ch * k for k in cfg.ch_mult)):
            if m % 32:
                raise ValueError(f"VQ: every width must be a multiple of 32 (GroupNorm(32)); ch={cfg.ch}, "
                                 f"ch_mult={cfg.ch_mult}")
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        self.quantize = _Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)
        self.eval()

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def train(self, mode: bool = True):  # an inference-only tokenizer: no dropout / usage statistics to update
        return super().train(False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str, *, preset: str = "VQ-16", config: Optional[VQConfig] = None,
                        map_location="cpu") -> "VQTokenizer":
        """Load a LlamaGen VQ checkpoint (e.g. ``vq_ds16_c2i.pt``) from a local file, strictly.

        The codebook size/width are read from the file; the conv widths come from ``preset`` (``VQ-16``, ``VQ-8``)
        or ``config``. Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an unreadable file or
        one whose parameter names/shapes differ from the architecture (the differences are listed)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VQ checkpoint not found: {path!r} (nothing is downloaded; pass a local "
                                    f"LlamaGen vq_ds16_c2i.pt)")
        try:
            # LlamaGen's training checkpoints also pickle their argparse.Namespace: the one extra type allowed.
            obj = load_checkpoint(path, map_location=map_location, allow=LLAMAGEN_TYPES, what="VQ checkpoint")
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            raise ValueError(f"VQ checkpoint {path!r} is not a readable torch checkpoint "
                             f"(corrupt, truncated or not a weights file): {exc}") from exc
        state = _unwrap_state_dict(obj, path)
        if config is None:
            if preset not in VQ_PRESETS:
                raise ValueError(f"unknown VQ preset {preset!r}; known: {sorted(VQ_PRESETS)}")
            base = VQ_PRESETS[preset]
            emb = state.get("quantize.embedding.weight")
            kwargs = dict(base.__dict__)
            if isinstance(emb, torch.Tensor) and emb.dim() == 2:
                kwargs.update(codebook_size=emb.shape[0], codebook_embed_dim=emb.shape[1])
            config = VQConfig(**kwargs)
        with torch.device("meta"):
            model = cls(config)
        model.check_state_dict(state, path)
        model = model.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        return model.eval()

    def check_state_dict(self, state: Dict[str, torch.Tensor], source: str = "state_dict") -> None:
        """Raise ``ValueError`` listing missing/unexpected keys and shape mismatches against this architecture."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            def few(xs):
                return ", ".join(xs[:6]) + (f" ... (+{len(xs) - 6} more)" if len(xs) > 6 else "")
            parts = [f"{len(missing)} missing: {few(missing)}" if missing else "",
                     f"{len(unexpected)} unexpected: {few(unexpected)}" if unexpected else "",
                     f"{len(shapes)} shape mismatches: {few(shapes)}" if shapes else ""]
            raise ValueError(f"VQ checkpoint {source!r} does not match the {self.config.ch_mult} architecture "
                             f"(ch={self.config.ch}, z={self.config.z_channels}): "
                             + "; ".join(p for p in parts if p))

    # ------------------------------------------------------------------ encode / decode
    def _param(self) -> torch.Tensor:
        return self.quant_conv.weight

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents ``(B, codebook_embed_dim, H/d, W/d)`` (before l2 normalisation)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VQ encode: images must be (B, 3, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"VQ encode: images must be floating point in [-1, 1], got {images.dtype}")
        d = self.downsample
        if images.shape[2] % d or images.shape[3] % d:
            raise ValueError(f"VQ encode: H and W must be multiples of {d}, got {tuple(images.shape[2:])}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"VQ encode: images must lie in [-1, 1] (LlamaGen normalises with mean=std=0.5), "
                             f"got values in [{lo:.3g}, {hi:.3g}]")
        p = self._param()
        return self.quant_conv(self.encoder(images.to(device=p.device, dtype=p.dtype)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, H/d * W/d)`` int64 codes (nearest l2-normalised codebook entry to
        the l2-normalised latent)."""
        z = self.latents(images)
        b = z.shape[0]
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float(), dim=-1)
        book = self.quantize.normalized_codebook().float()
        book_sq = book.square().sum(-1)
        codes = []
        for rows in flat.split(chunk):  # bound the (rows x codebook) distance matrix
            dist = rows.square().sum(-1, keepdim=True) + book_sq - 2.0 * rows @ book.T
            codes.append(dist.argmin(-1))
        return torch.cat(codes).reshape(b, -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid, *, clamp: bool = True) -> torch.Tensor:
        """``(B, h*w)`` codes -> ``(B, 3, h*d, w*d)`` images in [-1, 1] (clamped unless ``clamp=False``)."""
        height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            raise ValueError(f"VQ decode: codes must be (B, h*w), got "
                             f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"VQ decode: codes must be an integer tensor, got {codes.dtype}")
        if codes.shape[1] != height * width:
            raise ValueError(f"VQ decode: {codes.shape[1]} codes per image do not fill a {height}x{width} grid")
        n = self.config.codebook_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise ValueError(f"VQ decode: codes must lie in [0, {n}), got [{int(codes.min())}, {int(codes.max())}]")
        p = self._param()
        book = self.quantize.normalized_codebook()
        q = book[codes.to(p.device).long()].reshape(codes.shape[0], height, width, -1).permute(0, 3, 1, 2)
        out = self.decoder(self.post_quant_conv(q.to(p.dtype).contiguous()))
        return out.clamp(-1.0, 1.0) if clamp else out


def VQ_16(**overrides) -> VQTokenizer:
    """LlamaGen's VQ-16 (downsample 16) with random weights; ``overrides`` replace VQConfig fields."""
    return VQTokenizer(VQConfig(**{**VQ_PRESETS["VQ-16"].__dict__, **overrides}))


def VQ_8(**overrides) -> VQTokenizer:
    return VQTokenizer(VQConfig(**{**VQ_PRESETS["VQ-8"].__dict__, **overrides}))
