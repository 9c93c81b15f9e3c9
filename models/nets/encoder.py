"""Frozen bidirectional encoders for Mirai-I: anything that maps a batch of training images (as token grids) to
patch-indexed features ``(B, H*W, Z)``.

Nothing is downloaded. The built-in :class:`TokenEncoder` is a small bidirectional transformer trained here by
masked-token prediction on the training data (:func:`train_token_encoder`, well under a minute on a CPU for 8x8 shapes) and
cached on disk; :func:`load_encoder` loads a built-in encoder checkpoint from a local path through the one safe
loader (:mod:`models.checkpoint`: weights only, so a whole pickled ``nn.Module`` is refused: it could run code). Plug
in an encoder of your own as precomputed per-crop features (``--features-dir``, e.g. DINOv2's).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, atomic_save, load_checkpoint, require_keys


class TokenEncoder(nn.Module):
    """Bidirectional transformer over a token grid: ``forward(tokens (B, H*W) int64) -> (B, H*W, dim)`` features
    after a final LayerNorm (like DINOv2's patch tokens). Learned absolute positions; a mask token for training."""

    def __init__(self, vocab_size: int, num_positions: int, dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, num_positions=num_positions, dim=dim, depth=depth, heads=heads)
        self.embed = nn.Embedding(vocab_size + 1, dim)  # last row: [MASK]
        self.pos = nn.Parameter(torch.randn(num_positions, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)  # masked-token prediction, training only

    @property
    def mask_token(self) -> int:
        return self.config["vocab_size"]

    @property
    def out_dim(self) -> int:
        return self.config["dim"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(tokens) + self.pos[: tokens.shape[1]]))


def train_token_encoder(dataset, *, steps: int = 200, batch_size: int = 32, mask_ratio: float = 0.5, lr: float = 2e-3,
                        seed: int = 0, dim: int = 64, depth: int = 2, heads: int = 4) -> TokenEncoder:
    """Masked-token pretraining: predict ``mask_ratio`` of the tokens from the rest, so features see the whole
    image (the property Mirai-I needs from its encoder)."""
    g = torch.Generator().manual_seed(seed)
    tokens0, _ = dataset[0]
    encoder = TokenEncoder(dataset.vocab_size, tokens0.numel(), dim, depth, heads)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(steps):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=g)
        tokens = torch.stack([dataset[int(i)][0] for i in idx])
        masked = torch.rand(tokens.shape, generator=g) < mask_ratio
        logits = encoder.head(encoder(tokens.masked_fill(masked, encoder.mask_token)))
        loss = F.cross_entropy(logits[masked], tokens[masked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return encoder.eval().requires_grad_(False)


def save_encoder(encoder: TokenEncoder, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save({"kind": "token_encoder", "config": encoder.config, "state_dict": encoder.state_dict()}, path)


def load_encoder(path: str) -> nn.Module:
    """Load a frozen built-in encoder from a local file written by :func:`save_encoder` (weights only:
    :func:`models.checkpoint.load_checkpoint`; a pickled module is refused with a message)."""
    obj = require_keys(load_checkpoint(path, what="encoder file"), path, ["kind", "config", "state_dict"],
                       "built-in encoder checkpoint")
    if obj["kind"] != "token_encoder":
        raise CheckpointError(f"{path!r} is not a built-in encoder checkpoint (kind {obj['kind']!r})")
    encoder = TokenEncoder(**obj["config"])
    encoder.load_state_dict(obj["state_dict"])
    return encoder.eval().requires_grad_(False)


def builtin_encoder(dataset, cache_path: str, **train_kwargs) -> nn.Module:
    """The built-in encoder for ``dataset``: loaded from ``cache_path`` when present, else trained and cached."""
    if os.path.isfile(cache_path):
        return load_encoder(cache_path)
    encoder = train_token_encoder(dataset, **train_kwargs)
    save_encoder(encoder, cache_path)
    return encoder
