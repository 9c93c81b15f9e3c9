"""LlamaGen's class-conditional GPT, running through mirai_kernels.

Same parameter names, shapes and semantics as LlamaGen's ``gpt.py`` (``c2i`` models), so a LlamaGen ``c2i_*.pt``
state_dict loads strictly and gives LlamaGen's logits:

* ``cls_embedding.embedding_table`` (num_classes + 1 rows: the last is the null class of classifier-free guidance),
  ``tok_embeddings``, ``layers.{i}.attention.{wqkv,wo}``, ``layers.{i}.feed_forward.{w1,w2,w3}``,
  ``layers.{i}.{attention_norm,ffn_norm}``, ``norm``, ``output``; no biases;
* RMSNorm (eps 1e-5, computed in fp32), SwiGLU with hidden = find_multiple(int(2 * 4d / 3), 256);
* 2D RoPE with **zero** class-token rows (``mirai_kernels.rope_2d_table``); the table is rebuilt, never stored;
* training input ``[class, z_0 .. z_{N-2}]``, logits for every position predict ``z_0 .. z_{N-1}``;
* dropout: token 0.1, residual 0.1, FFN 0.1 and class-label dropout 0.1 to the null class, as LlamaGen's defaults;
* init N(0, 0.02) for Linear and Embedding, the output layer zero.

Attention runs through :class:`mirai_kernels.ForesightAttention` (one kernel for the causal output and, when
asked, the bidirectional one); decoding goes through the same module (it owns the cache path: a static per-row
KV cache driven by ``cache_seqlens``, :func:`mirai_kernels.decode_attention` underneath). LlamaGen's c2i
checkpoints load with :func:`load_llamagen_gpt` (all of LlamaGen's layouts; presets ``GPT-B`` ... ``GPT-3B``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import mirai_kernels as mk

from ..checkpoint import CheckpointError


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    grid: tuple = (16, 16)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def block_size(self) -> int:
        """Image tokens per sample (H*W)."""
        return self.grid[0] * self.grid[1]


PRESETS = {
    "micro": dict(dim=128, n_layer=4, n_head=2),  # CPU studies (benchmarks/convergence.py): ~2x faster steps than tiny
    "tiny": dict(dim=256, n_layer=4, n_head=4),
    "small": dict(dim=384, n_layer=6, n_head=6),
    "B": dict(dim=768, n_layer=12, n_head=12),
    "L": dict(dim=1024, n_layer=24, n_head=16),
    "XL": dict(dim=1280, n_layer=36, n_head=20),
    # LlamaGen's class-conditional zoo by LlamaGen's names (its gpt.py: GPT_models; n_kv_head = n_head in all of
    # them). GPT-3B is listed among LlamaGen's t2i configs but also ships as a c2i checkpoint (c2i_3B_384.pt).
    "GPT-B": dict(dim=768, n_layer=12, n_head=12, n_kv_head=12),  # 111M
    "GPT-L": dict(dim=1024, n_layer=24, n_head=16, n_kv_head=16),  # 343M
    "GPT-XL": dict(dim=1280, n_layer=36, n_head=20, n_kv_head=20),  # 775M
    "GPT-XXL": dict(dim=1536, n_layer=48, n_head=24, n_kv_head=24),  # 1.4B
    "GPT-XXXL": dict(dim=2560, n_layer=48, n_head=40, n_kv_head=40),  # 3.9B
    "GPT-3B": dict(dim=3200, n_layer=24, n_head=32, n_kv_head=32),  # 3.1B
}


def config_from_preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    grid = overrides.pop("grid", (16, 16))
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    return GPTConfig(**{**PRESETS[name], **overrides, "grid": grid})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = int(2 * (4 * config.dim) / 3)
        if config.ffn_dim_multiplier is not None:
            hidden = int(config.ffn_dim_multiplier * hidden)
        hidden = find_multiple(hidden, config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Static per-layer cache ``(max_batch, max_seqlen, n_kv_head, head_dim)`` (BSHD, as decode_attention)."""

    def __init__(self, max_batch: int, max_seqlen: int, n_kv_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, max_seqlen, n_kv_head, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = mk.ForesightAttention(config)  # LlamaGen's constructor call
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def _ffn_residual(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, rope_table: torch.Tensor) -> torch.Tensor:
        return self._ffn_residual(x + self.attention(self.attention_norm(x), rope_table))

    def forward_dual(self, x: torch.Tensor, rope_table: torch.Tensor, bidirectional_grad: bool = False):
        """The block's causal output and the same block computed with the bidirectional attention output in
        place of the causal one (the Mirai-S target), from one attention call."""
        out_c, out_b = self.attention(self.attention_norm(x), rope_table, bidirectional=True,
                                      bidirectional_grad=bidirectional_grad)
        return self._ffn_residual(x + out_c), self._ffn_residual(x + out_b)

    def forward_decode(self, x: torch.Tensor, rope_table: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """``x`` (B, S_q, dim) new tokens at rows ``cache_seqlens ..`` of the attention's KV cache (which this call
        fills; the caller advances ``cache_seqlens``). The attention module owns the cache path."""
        return self._ffn_residual(x + self.attention(self.attention_norm(x), rope_table, cache_seqlens=cache_seqlens))


class ClassEmbedder(nn.Module):
    """Class labels -> one prefix embedding; label dropout to the null class ``num_classes`` when training."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = ClassEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("rope_table", self._build_rope_table(), persistent=False)
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)

    def _build_rope_table(self, device=None) -> torch.Tensor:
        c = self.config
        return mk.rope_2d_table(c.grid, c.head_dim, c.cls_token_num, c.rope_base, device=device)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` cast every floating buffer, but the RoPE table must stay
        fp32 (the kernels require it, and LlamaGen keeps its ``freqs_cis`` fp32 under its bf16 default): a cast
        table is rebuilt exactly in fp32 on its new device (never upcast from the rounded copy)."""
        super()._apply(fn, recurse)
        table = self._buffers.get("rope_table")
        if table is not None and table.dtype != torch.float32 and table.device.type != "meta":
            self._buffers["rope_table"] = self._build_rope_table(table.device)
        return self

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # -----------------------------------------------------------------------------------------------------
    # Training
    # -----------------------------------------------------------------------------------------------------

    def embed(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.cls_embedding(labels, train=self.training)[:, : self.config.cls_token_num]
        return self.tok_dropout(torch.cat([cond, self.tok_embeddings(idx)], dim=1))

    def forward(self, idx: torch.Tensor, cond_idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                hidden_layer: Optional[int] = None, dual_layer: Optional[int] = None, stop_at: Optional[int] = None):
        """Training / teacher forward: ``logits, loss = model(idx, cond_idx, targets)`` as LlamaGen's.

        Arguments:
            idx: ``(B, N-1)`` int64 image tokens ``z_0 .. z_{N-2}`` (N = H*W; any prefix of them).
            cond_idx: ``(B,)`` int64 class labels (``num_classes`` = the null class); LlamaGen's name.
            targets: optional ``(B, N)`` int64 ``z_0 .. z_{N-1}`` for the cross-entropy.
            hidden_layer: also return the raw residual state after block ``hidden_layer`` (1-based count of
                blocks, as Mirai's ``l``: 8 of 12 for GPT-B), no final norm: ``(B, prefix + N - 1, dim)``.
            dual_layer: at block ``dual_layer`` (1-based) also compute its bidirectional-attention version
                (stop-gradient) and return it as ``bidir_hidden`` (Mirai-S target).
            stop_at: run only blocks ``1 .. stop_at`` (a truncated teacher); logits are then None.
        Return:
            ``(logits, loss)`` as LlamaGen: logits ``(B, N, vocab)`` fp32 (None when ``stop_at``), loss the mean
            cross-entropy or None without ``targets``. Only when ``hidden_layer``, ``dual_layer`` or ``stop_at`` is
            given: ``(logits, loss, extras)`` with ``extras`` a dict holding ``hidden`` / ``bidir_hidden`` as asked
            (so a two-name unpack of an extended call fails loudly instead of dropping outputs).
        """
        h = self.embed(idx, cond_idx)
        table = self.rope_table
        extras = {}
        n_blocks = len(self.layers) if stop_at is None else stop_at
        for i, layer in enumerate(self.layers[:n_blocks], start=1):
            if i == dual_layer:
                h, extras["bidir_hidden"] = layer.forward_dual(h, table)
            else:
                h = layer(h, table)
            if i == hidden_layer:
                extras["hidden"] = h
        extended = hidden_layer is not None or dual_layer is not None or stop_at is not None
        logits = loss = None
        if stop_at is None:
            logits = self.output(self.norm(h)).float()
            logits = logits[:, self.config.cls_token_num - 1:]
            if targets is not None:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return (logits, loss, extras) if extended else (logits, loss)

    # -----------------------------------------------------------------------------------------------------
    # Decoding (KV cache)
    # -----------------------------------------------------------------------------------------------------

    def setup_caches(self, max_batch: int, max_seqlen: Optional[int] = None, dtype=None) -> None:
        """Allocate a static KV cache for every layer (``max_seqlen`` defaults to prefix + H*W)."""
        max_seqlen = max_seqlen or self.config.cls_token_num + self.config.block_size
        dtype = dtype or self.output.weight.dtype
        device = self.output.weight.device
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(max_batch, max_seqlen, attn.n_kv_head, attn.head_dim, dtype, device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def decode_step(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                    cache_seqlens: torch.Tensor) -> torch.Tensor:
        """One cached step: the class prefix (``labels`` (B,), tokens None) or new image tokens ``(B, S_q)``.
        Returns the last position's logits ``(B, vocab)`` fp32. The caller advances ``cache_seqlens``."""
        if tokens is None:
            x = self.cls_embedding(labels, train=False)[:, : self.config.cls_token_num]
        else:
            x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer.forward_decode(x, self.rope_table, cache_seqlens)
        return self.output(self.norm(x[:, -1])).float()


def build_gpt(preset: str = "tiny", **overrides) -> GPT:
    return GPT(config_from_preset(preset, **overrides))


# ---------------------------------------------------------------------------------------------------------
# LlamaGen checkpoints
# ---------------------------------------------------------------------------------------------------------

# Where LlamaGen's scripts put the GPT weights, in the order its sample_c2i.py looks: DDP training ("model"),
# DeepSpeed ("module"), Lightning-style ("state_dict"); "ema" when a file holds only the EMA weights. A bare
# state dict is what its FSDP training consolidates.
LLAMAGEN_WEIGHT_KEYS = ("model", "module", "state_dict", "ema")
# Name prefixes left by wrappers (torch.compile, DDP/DeepSpeed) on every key of a saved state dict.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def llamagen_state_dict(obj, *, source: str = "checkpoint") -> dict:
    """The GPT ``state_dict`` inside an already-loaded LlamaGen checkpoint ``obj``, ready for a strict load into
    :class:`GPT`.

    Reads the ``"model"`` / ``"module"`` / ``"state_dict"`` / ``"ema"`` layouts (first present wins, LlamaGen's
    order) and bare (FSDP-consolidated) state dicts; strips ``_orig_mod.`` / ``module.`` key prefixes; drops a stored
    ``freqs_cis`` (older LlamaGen versions kept the RoPE table in the state dict; ours is rebuilt) and stray KV-cache
    buffers. Refuses a text-to-image (t2i) checkpoint, naming it, since only class-conditional GPTs exist here.
    ``source`` names the file in messages.
    """
    args = obj.get("args") if isinstance(obj, dict) else None
    if getattr(args, "gpt_type", "c2i") == "t2i":
        raise CheckpointError(f"{source} is a LlamaGen text-to-image (t2i) checkpoint (its args say gpt_type='t2i'); "
                         "only class-conditional (c2i) GPTs can be loaded here")
    if _is_state_dict(obj):
        state = obj
    else:
        key = next((k for k in LLAMAGEN_WEIGHT_KEYS if isinstance(obj, dict) and _is_state_dict(obj.get(k))), None)
        if key is None:
            keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{source} holds no LlamaGen GPT weights: expected a state dict, bare (FSDP) or under "
                             f"one of {list(LLAMAGEN_WEIGHT_KEYS)}; found {keys}")
        state = obj[key]
    out = {}
    for name, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        if name == "freqs_cis" or name == "causal_mask" or ".kv_cache." in name:
            continue
        out[name] = value
    if any(k.startswith("cls_embedding.cap_proj.") or k == "cls_embedding.uncond_embedding" for k in out):
        raise CheckpointError(f"{source} is a LlamaGen text-to-image (t2i) GPT (it has a caption projection, "
                         "cls_embedding.cap_proj); only class-conditional (c2i) GPTs can be loaded here")
    if "tok_embeddings.weight" not in out:
        raise CheckpointError(f"{source} does not look like a LlamaGen GPT state dict (no tok_embeddings.weight; keys: "
                         f"{sorted(out)[:6]})")
    return out


def load_llamagen_gpt(path: str, *, gpt_model: Optional[str] = None, image_size: Optional[int] = None,
                      downsample_size: int = 16, codebook_size: int = 16384, num_classes: Optional[int] = None,
                      cls_token_num: int = 1, device="cpu") -> GPT:
    """A :class:`GPT` (eval mode) from a LlamaGen c2i GPT checkpoint such as ``c2i_B_256.pt``: LlamaGen's
    ``sample_c2i.py`` flags ``--gpt-model GPT-B --image-size 256`` (``--downsample-size``, ``--codebook-size``,
    ``--num-classes``, ``--cls-token-num`` as LlamaGen's defaults). ``gpt_model``/``image_size`` default to the
    checkpoint's stored ``args`` when it has them; ``num_classes`` to the class table's size.

    Loaded through :func:`models.checkpoint.load_checkpoint` (``weights_only=True``; the only extra type allowed is
    the ``argparse.Namespace`` LlamaGen's training stores), then :func:`llamagen_state_dict`, then a strict load:
    a shape or name mismatch is reported against the flags.
    """
    from ..checkpoint import LLAMAGEN_TYPES, load_checkpoint

    obj = load_checkpoint(path, allow=LLAMAGEN_TYPES, what="--gpt-ckpt")
    state = llamagen_state_dict(obj, source=f"--gpt-ckpt {path!r}")
    stored = obj.get("args") if isinstance(obj, dict) else None
    gpt_model = gpt_model or getattr(stored, "gpt_model", None)
    image_size = image_size or getattr(stored, "image_size", None)
    if gpt_model is None or image_size is None:
        raise CheckpointError(f"--gpt-ckpt {path!r}: pass --gpt-model (e.g. GPT-B) and --image-size (e.g. 256); the file "
                         "does not record them")
    if gpt_model not in PRESETS:
        raise CheckpointError(f"--gpt-model {gpt_model!r}: not a class-conditional preset; choose one of "
                         f"{[k for k in PRESETS if k.startswith('GPT-')]} (or {[k for k in PRESETS if not k.startswith('GPT-')]})")
    if image_size % downsample_size:
        raise CheckpointError(f"--image-size {image_size} is not a multiple of --downsample-size {downsample_size}")
    rows = state["cls_embedding.embedding_table.weight"].shape[0] if "cls_embedding.embedding_table.weight" in state \
        else None
    if num_classes is None:
        num_classes = (rows - 1) if rows else 1000
    class_dropout = 0.1 if rows is None or rows > num_classes else 0.0  # the null class row exists iff trained with it
    grid = image_size // downsample_size
    model = GPT(config_from_preset(gpt_model, vocab_size=codebook_size, num_classes=num_classes, grid=grid,
                                   cls_token_num=cls_token_num, class_dropout_prob=class_dropout))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"--gpt-ckpt {path!r} does not match --gpt-model {gpt_model} --codebook-size "
                         f"{codebook_size} --num-classes {num_classes}: {str(exc)[:600]}") from exc
    return model.to(device).eval()


def load_sampling_model(path: str, device="cpu") -> GPT:
    """A plain GPT from a sampling checkpoint (``model.pt``) or a training checkpoint (``last.pt``: its EMA),
    read by :func:`models.checkpoint.load_checkpoint` (weights_only; errors name the file)."""
    from ..checkpoint import load_checkpoint, require_keys

    ckpt = require_keys(load_checkpoint(path, what="--ckpt"), path, ["config"], "mirai checkpoint")
    if "model" not in ckpt and "ema" not in ckpt:
        raise CheckpointError(f"{path!r} is not a mirai checkpoint: no 'model' or 'ema' weights "
                              f"(its keys: {sorted(map(str, ckpt))[:8]})")
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"], strict=True)
    except (TypeError, RuntimeError) as exc:  # unknown config fields, weights of another shape
        raise CheckpointError(f"{path!r}: its weights do not fit its own config ({str(exc)[:300]})") from exc
    return model.to(device).eval()
