"""DINOv2 ViT (S/B/L/g, patch 14, optional register tokens) as the frozen Mirai-I encoder, loaded from a local file.

Nothing is downloaded. The module, parameter and buffer names and shapes are those of the official hub backbones
(``dinov2_vit{s,b,l,g}14[_reg]_pretrain.pth``), so such a state_dict loads with ``strict=True``::

    cls_token (1, 1, D)   pos_embed (1, 1 + 37*37, D)   [register_tokens (1, 4, D)]   mask_token (1, D)
    patch_embed.proj.{weight (D, 3, 14, 14), bias (D,)}
    blocks.{i}.norm1.{weight, bias}            blocks.{i}.attn.qkv.{weight (3D, D), bias (3D,)}
    blocks.{i}.attn.proj.{weight (D, D), bias} blocks.{i}.ls1.gamma (D,)
    blocks.{i}.norm2.{weight, bias}            blocks.{i}.mlp.fc1.{weight (4D, D), bias}, mlp.fc2.{weight (D, 4D), bias}
                                               (ViT-g: mlp.w12.{weight (2F, D), bias}, mlp.w3.{weight (D, F), bias}, F = 4096)
    blocks.{i}.ls2.gamma (D,)                  norm.{weight, bias}

The hub models are built for 518 px (37x37 patches); other inputs get the position table resampled bicubically the
way DINOv2 does it (:meth:`DinoV2.interpolate_pos_encoding`), including its small scale-factor offset (0.1) for the
plain models and the offset-free, anti-aliased variant of the ``_reg`` models.

Mirai-I target: :meth:`DinoV2.forward_patch_features` on the ImageNet-normalised 224 px crop (16x16 patches)
gives the final-LayerNorm-ed patch tokens ``(B, 256, D)`` in raster order, patch ``k`` aligned with code ``k`` of
the 256 px crop's 16x16 VQ grid. :func:`imagenet_preprocess` turns LlamaGen's [-1, 1] crops (or uint8 images) into
that input.

Prepared as Mirai prepares it (the official ``train_c2i_Mirai_I.py``; the default of :mod:`models.extract_features`):
the position table is resampled **once** to the 16x16 grid with :func:`resample_abs_pos_embed` (timm's semantics:
size-based bicubic *with* antialiasing, in fp32; :meth:`DinoV2.resample_pos_embed_`), after which DINOv2's own
per-forward interpolation is the identity at 224 px; the crops are resized 256 -> 224 with plain bicubic (no
antialiasing, no clamp; ``imagenet_preprocess(resize="bicubic")``). Our earlier preparation stays as an option
(``resize="antialias"`` and no resampling, i.e. DINOv2's scale-factor interpolation at every forward). The two
16x16 tables differ by 14% (mean relative, per row) on a smooth synthetic 37x37 table (random 2-D sinusoids), and
far more on a white-noise one (the antialiased resize low-passes it), so the features differ accordingly.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import UnsafeCheckpointError, load_checkpoint

__all__ = ["DinoV2", "DinoV2Config", "ARCHS", "dinov2_config", "imagenet_preprocess", "resample_abs_pos_embed",
           "RESIZES", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DinoV2Config:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    img_size: int = 518  # sets the stored position table: (img_size // patch_size) ** 2 + 1 rows
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (ViT-g)
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    layerscale: bool = True
    in_chans: int = 3


_BASE = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
# The register models were trained with the offset-free, anti-aliased resampling; keep it to match their features.
_REG = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
ARCHS: Dict[str, DinoV2Config] = {}
for _name, _kw in _BASE.items():
    ARCHS[_name] = DinoV2Config(**_kw)
    ARCHS[_name + "_reg"] = DinoV2Config(**_kw, **_REG)


def dinov2_config(arch: Union[str, DinoV2Config, dict] = "vitb14", **overrides) -> DinoV2Config:
    """A named architecture (``vits14 vitb14 vitl14 vitg14`` and their ``_reg`` variants), a config, or a dict of
    config fields; ``overrides`` replace fields (e.g. ``depth=2`` for tests). A name may carry overrides after a
    colon, ``"vitb14:depth=2,embed_dim=64,num_heads=4"``."""
    if isinstance(arch, DinoV2Config):
        cfg = arch
    elif isinstance(arch, dict):
        cfg = DinoV2Config(**arch)
    elif isinstance(arch, str):
        arch, _, extra = arch.partition(":")
        if extra:  # "vitb14:depth=2,embed_dim=64" (CLI spelling of overrides)
            overrides = {**_parse_overrides(extra), **overrides}
        key = arch.lower().replace("dinov2_", "").replace("-", "").replace("/", "")
        if key not in ARCHS:
            raise ValueError(f"DINOv2: unknown arch {arch!r}; known: {', '.join(ARCHS)}")
        cfg = ARCHS[key]
    else:
        raise TypeError(f"DINOv2: arch must be a name, a DinoV2Config or a dict, got {type(arch).__name__}")
    cfg = replace(cfg, **overrides) if overrides else cfg
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"DINOv2: embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    if cfg.ffn not in ("mlp", "swiglu"):
        raise ValueError(f"DINOv2: ffn must be 'mlp' or 'swiglu', got {cfg.ffn!r}")
    return cfg


def _parse_overrides(text: str) -> dict:
    types = {f: type(v) for f, v in asdict(DinoV2Config()).items()}
    out = {}
    for item in filter(None, text.split(",")):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in types:
            raise ValueError(f"DINOv2: bad arch override {item!r}; use name=value with name in {', '.join(types)}")
        kind = types[name]
        out[name] = value.strip().lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D): raster order


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        # qkv's output features are ordered (q|k|v, head, head_dim)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class SwiGLU(nn.Module):
    """ViT-g's FFN: one packed input projection ``w12`` = [gate; value]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # DINOv2 shrinks the width by 2/3 (same parameter count as the GELU MLP) and rounds up to a multiple of 8.
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, hidden) if cfg.ffn == "mlp" else SwiGLU(d, hidden)
        self.ls2 = LayerScale(d) if cfg.layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2 vision transformer (inference only: no drop-path, no chunked blocks; the masking token is kept as a
    parameter so the official checkpoints load strictly).

    ``forward(images)`` is :meth:`forward_patch_features`, so the model plugs in wherever Mirai-I expects an
    images -> ``(B, N, Z)`` encoder. ``out_dim`` is ``Z``.
    """

    def __init__(self, arch: Union[str, DinoV2Config, dict] = "vitb14", **overrides):
        super().__init__()
        cfg = self.config = dinov2_config(arch, **overrides)
        d, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d)) \
            if cfg.num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # a random model is still well-conditioned (tests)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def out_dim(self) -> int:
        return self.config.embed_dim

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    # ------------------------------------------------------------------------------------------------ positions
    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position table ``(1, 1 + grid_h*grid_w, D)`` for a ``grid_h x grid_w`` patch grid.

        The stored table itself when the grid is the trained one; otherwise its patch part resampled bicubically
        (in fp32, class row untouched). Like DINOv2, the plain models pass ``scale_factor = (n + offset) / M`` rather
        than the output size: the offset keeps ``floor(M * scale)`` from landing one short of ``n``, and because the
        resampling kernel then uses that factor for its source coordinates, the result differs slightly from a
        size-based resize; matching the pretrained features needs the same call.
        """
        pos = self.pos_embed
        n_stored = pos.shape[1] - 1
        if grid_h * grid_w == n_stored and grid_h == grid_w:
            return pos
        m = int(math.isqrt(n_stored))
        if m * m != n_stored:
            raise ValueError(f"DINOv2: the stored position table has {n_stored} patch rows, not a square grid")
        dim = pos.shape[-1]
        table = pos[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        if offset:
            size_kw = dict(scale_factor=((grid_h + offset) / m, (grid_w + offset) / m))
        else:
            size_kw = dict(size=(grid_h, grid_w))
        table = F.interpolate(table, mode="bicubic", antialias=self.config.interpolate_antialias, **size_kw)
        if tuple(table.shape[-2:]) != (grid_h, grid_w):
            raise RuntimeError(f"DINOv2: position resampling gave {tuple(table.shape[-2:])}, "
                               f"expected {(grid_h, grid_w)}")
        table = table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([pos[:, :1].float(), table], dim=1).to(pos.dtype)

    def resample_pos_embed_(self, grid_h: int, grid_w: Optional[int] = None) -> "DinoV2":
        """Replace the stored position table by its :func:`resample_abs_pos_embed` to a ``grid_h x grid_w`` patch
        grid, once (the official Mirai-I preparation: 16x16 for 224 px), so that inputs of that size use it as is.
        Square grids only (the stored table must stay square for :meth:`interpolate_pos_encoding`). Returns self."""
        grid_w = grid_h if grid_w is None else grid_w
        if grid_h != grid_w or grid_h < 1:
            raise ValueError(f"DINOv2: resample_pos_embed_ needs a square grid, got {grid_h}x{grid_w}")
        with torch.no_grad():
            table = resample_abs_pos_embed(self.pos_embed.detach(), (grid_h, grid_w), num_prefix_tokens=1)
        self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        self.config = replace(self.config, img_size=grid_h * self.config.patch_size)
        return self

    # ------------------------------------------------------------------------------------------------ forward
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"DINOv2: images must be a (B, {self.config.in_chans}, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        b, c, h, w = images.shape
        p = self.config.patch_size
        if c != self.config.in_chans:
            raise ValueError(f"DINOv2: images have {c} channels, expected {self.config.in_chans} "
                             f"(B, C, H, W layout, ImageNet-normalised RGB)")
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"DINOv2: image size {h}x{w} is not a positive multiple of the patch size {p} "
                             f"(224 px gives 16x16 patches); resize first (imagenet_preprocess)")
        if not images.is_floating_point():
            raise ValueError(f"DINOv2: images must be floating point (ImageNet-normalised), got {images.dtype}; "
                             f"use imagenet_preprocess for uint8 or [-1, 1] images")

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings + positions, with the class token first and the register tokens (no position) after it."""
        self._check_images(images)
        images = images.to(self.patch_embed.proj.weight.dtype)
        b, _, h, w = images.shape
        p = self.config.patch_size
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(h // p, w // p)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """DINOv2's output dict: ``x_norm_clstoken (B, D)``, ``x_norm_regtokens (B, R, D)``,
        ``x_norm_patchtokens (B, h*w, D)``, ``x_prenorm (B, 1+R+h*w, D)``."""
        x = self.prepare_tokens(images)
        for blk in self.blocks:
            x = blk(x)
        xn = self.norm(x)
        r = self.config.num_register_tokens
        return {"x_norm_clstoken": xn[:, 0], "x_norm_regtokens": xn[:, 1:1 + r],
                "x_norm_patchtokens": xn[:, 1 + r:], "x_prenorm": x}

    def forward_patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 3, H, W)`` ImageNet-normalised, ``H, W`` multiples of 14 -> final-LayerNorm-ed patch tokens
        ``(B, (H/14)*(W/14), D)`` in raster order (224 px: ``(B, 256, D)``, the Mirai-I target features)."""
        return self.forward_features(images)["x_norm_patchtokens"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_patch_features(images)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str, arch: Union[str, DinoV2Config, dict] = "vitb14", *,
                        map_location="cpu", **overrides) -> "DinoV2":
        """Build ``arch`` and load a local DINOv2 state_dict strictly; returns the model in eval mode, frozen.

        Accepts a bare state_dict (the hub ``*_pretrain.pth`` files) or one under ``"model"``/``"state_dict"``/
        ``"teacher"``, with an optional ``module.``/``backbone.`` prefix and chunked (``blocks.c.i.``) block
        names. A position table of another trained size (e.g. a 224 px fine-tune) sets ``img_size`` from the file.
        Errors: :class:`FileNotFoundError` for a missing file; :class:`ValueError` for an unreadable file or a
        state_dict that does not match ``arch`` (missing, unexpected and mis-shaped keys are listed).
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DINOv2 checkpoint not found: {path!r} (nothing is downloaded: pass a local "
                                    f"state_dict such as dinov2_vitb14_pretrain.pth)")
        try:
            obj = load_checkpoint(path, map_location=map_location, what="DINOv2 checkpoint")
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated / foreign files
            raise ValueError(f"DINOv2 checkpoint {path!r} is corrupt or not a torch state_dict: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        state = _unwrap_state_dict(obj, path)
        cfg = dinov2_config(arch, **overrides)
        pos = state.get("pos_embed")
        if "img_size" not in overrides and isinstance(pos, torch.Tensor) and pos.dim() == 3:
            grid = math.isqrt(pos.shape[1] - 1) if pos.shape[1] > 1 else 0
            if grid * grid == pos.shape[1] - 1 and grid * cfg.patch_size != cfg.img_size:
                cfg = replace(cfg, img_size=grid * cfg.patch_size)
        with torch.device("meta"):
            model = cls(cfg)
        _check_state_dict(model, state, path, arch)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)


def _unwrap_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"DINOv2 checkpoint {path!r} does not hold a state_dict (got {type(obj).__name__})")
    for prefix in ("module.", "backbone."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")  # block_chunks > 0: blocks.<chunk>.<global index>.
    if any(chunked.match(k) for k in obj):
        obj = {chunked.sub(r"blocks.\1.", k): v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"DINOv2 checkpoint {path!r}: non-tensor entries {bad[:5]}")
    return obj


def _check_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], path: str, arch) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
                    for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if not (missing or unexpected or shapes):
        return

    def show(items):
        return "; ".join(items[:8]) + (f"; ... ({len(items)} in all)" if len(items) > 8 else "")

    lines = [f"DINOv2 checkpoint {path!r} does not match arch {arch!r} ({len(state)} tensors in the file, "
             f"{len(expected)} in the model)"]
    if missing:
        lines.append(f"missing keys: {show(missing)}")
    if unexpected:
        lines.append(f"unexpected keys: {show(unexpected)}")
    if shapes:
        lines.append(f"shape mismatches: {show(shapes)}")
    hint = _guess_arch(state)
    if hint:
        lines.append(f"the file looks like {hint}")
    raise ValueError("\n  ".join(lines))


def _guess_arch(state: Dict[str, torch.Tensor]) -> Optional[str]:
    norm = state.get("norm.weight")
    if norm is None:
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    reg = "_reg" if "register_tokens" in state else ""
    for name, cfg in ARCHS.items():
        if cfg.embed_dim == norm.shape[0] and cfg.depth == depth and bool(reg) == bool(cfg.num_register_tokens):
            return f"arch {name!r}"
    return f"embed_dim={norm.shape[0]}, depth={depth}{', with register tokens' if reg else ''}"


def resample_abs_pos_embed(pos_embed: torch.Tensor, new_size, *, num_prefix_tokens: int = 1) -> torch.Tensor:
    """A ViT absolute position table resampled to ``new_size = (h, w)`` patches with timm's
    ``resample_abs_pos_embed`` semantics (what the official Mirai-I applies to DINOv2 once): the ``num_prefix_tokens``
    leading rows (class token) untouched; the patch rows, a square ``M x M`` grid, resized **by size** with bicubic
    interpolation **with antialiasing**, computed in fp32 and cast back to the table's dtype. The table itself when
    it already has ``h * w`` patch rows and ``h == w``.

    ``pos_embed``: ``(1, num_prefix_tokens + M*M, D)``; returns ``(1, num_prefix_tokens + h*w, D)``."""
    h, w = (new_size, new_size) if isinstance(new_size, int) else tuple(new_size)
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"resample_abs_pos_embed: pos_embed must be (1, prefix + M*M, D), got "
                         f"{tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - num_prefix_tokens
    if n == h * w and h == w:
        return pos_embed
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"resample_abs_pos_embed: {n} patch rows are not a square grid")
    prefix, table = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = table.shape[-1]
    grid = table.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    table = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, table], dim=1)


# How crops are resized to the encoder's input: "bicubic" = the official Mirai-I (plain bicubic, no antialiasing, no
# clamp); "antialias" = our earlier choice (antialiased bicubic as torchvision's tensor Resize, then clamped).
RESIZES = ("bicubic", "antialias")


def imagenet_preprocess(images: torch.Tensor, size: Optional[int] = 224, value_range: str = "auto",
                        resize: str = "bicubic") -> torch.Tensor:
    """Images -> the DINOv2 input: ``(B, 3, size, size)`` fp32, ImageNet mean/std normalised.

    ``images``: ``(B, 3, H, W)`` or ``(3, H, W)``; ``uint8`` in [0, 255], or floating point in [-1, 1] (LlamaGen's
    normalisation; ``value_range="auto"`` or ``"-1,1"``) or in [0, 1] (``value_range="0,1"``). When the size
    differs, resized so a 256 px LlamaGen crop becomes the 224 px, 16x16-patch view of the same content:
    ``resize="bicubic"`` (default) as the official Mirai-I — ``F.interpolate(mode="bicubic")``, no antialiasing,
    no clamp (bicubic overshoot at edges is kept; normalising before or after the resize is the same linear map);
    ``resize="antialias"``: antialiased bicubic (torchvision's tensor ``Resize``), then clamped to [0, 1].
    ``size=None`` keeps the resolution.
    """
    if resize not in RESIZES:
        raise ValueError(f"imagenet_preprocess: resize must be one of {RESIZES}, got {resize!r}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"imagenet_preprocess: expected a tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"imagenet_preprocess: images must be (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        if value_range in ("auto", "-1,1"):
            x = (images.float() + 1.0) * 0.5
        elif value_range == "0,1":
            x = images.float()
        else:
            raise ValueError(f"imagenet_preprocess: value_range must be 'auto', '-1,1' or '0,1', got {value_range!r}")
    else:
        raise ValueError(f"imagenet_preprocess: images must be uint8 or floating point, got {images.dtype}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=resize == "antialias", align_corners=False)
    if resize == "antialias":
        x = x.clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def state_dict_shapes(arch: Union[str, DinoV2Config, dict] = "vitb14", **overrides) -> Dict[str, tuple]:
    """Every state_dict key of ``arch`` with its shape, without allocating the weights."""
    with torch.device("meta"):
        model = DinoV2(arch, **overrides)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def config_dict(model: DinoV2) -> dict:
    return asdict(model.config)
