"""The evaluation's feature extractor for palette-image data: a small CNN classifier trained here, cached on disk.

FID/KID/precision-recall need a feature space in which "looks like the data" is measurable; ImageNet's Inception
knows nothing about 8x8 palette images, so the project trains its own: :class:`PaletteClassifier` learns to tell
the built-in ``shapes`` classes apart (:func:`train_classifier`: 400 steps, ~8 s on 2 idle cores for 8x8, ~70 s
when they are shared; ~99% held-out accuracy) and its penultimate layer (64-d, post-ReLU like Inception's pool
features, scaled to unit mean square) is the FID/KID/PRC feature, its logits the Inception-Score feature.
:func:`builtin_classifier` trains one on first use and caches it (``runs/eval/classifier-<data>-<H>x<W>-seed<S>.pt``);
the ``ClassifierFeatureExtractor`` (:func:`register_with_torch_fidelity`) wraps it for torch-fidelity (registered
under :data:`EXTRACTOR_NAME`, weights from a local file only).

The classifier is trained on its own split of the data (seed ``CLASSIFIER_SEED_OFFSET`` away from the training and
held-out splits), so it has seen neither the images a model was trained on nor the reference set.
"""

from __future__ import annotations

import hashlib
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, atomic_save, load_checkpoint, require_keys
from ..data.tokenizer import DEFAULT_PALETTE

EXTRACTOR_NAME = "mirai-palette-classifier"
FEATURES = ("features", "logits")
CLASSIFIER_SEED_OFFSET = 104_729  # classifier data: seed + this (train split = seed, held-out = seed + 7919)


class PaletteClassifier(nn.Module):
    """Token grid -> (features (B, feature_dim), logits (B, num_classes)).

    Input: ``(B, H*W)`` or ``(B, H, W)`` int64 tokens in ``[0, vocab_size)``. The one-hot image is stacked with its
    left-right and top-bottom mirror images, so the first convolution can compare each pixel with its mirror
    partner (several classes are defined by such long-range equalities); then three 3x3 convolutions, a flatten
    (positions matter: a frame is a border, not a texture) and a 64-d ReLU layer, the features."""

    def __init__(self, vocab_size: int = 8, num_classes: int = 10, grid=(8, 8), width: int = 16,
                 feature_dim: int = 64):
        super().__init__()
        height, width_px = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, grid=(height, width_px), width=width,
                           feature_dim=feature_dim)
        self.convs = nn.Sequential(
            nn.Conv2d(3 * vocab_size, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(width * height * width_px, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        # Features are reported times this (set after training so that mean ||f||^2 / dim = 1): KID's polynomial
        # kernel (x.y / dim + 1)^3 and FID's scale assume Inception-like O(1) coordinates, not raw ReLU outputs.
        self.register_buffer("feature_scale", torch.ones(()))

    @property
    def grid(self):
        return self.config["grid"]

    def forward(self, tokens: torch.Tensor):
        height, width = self.grid
        tokens = tokens.reshape(tokens.shape[0], height, width)
        x = F.one_hot(tokens.long(), self.config["vocab_size"]).permute(0, 3, 1, 2).float()
        x = torch.cat([x, x.flip(-1), x.flip(-2)], dim=1)
        features = F.relu(self.fc(self.convs(x).flatten(1)))
        return features * self.feature_scale, self.head(features)


def _tensors(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([t for t, _ in items]), torch.tensor([int(l) for _, l in items])


def train_classifier(dataset, *, steps: int = 400, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     eval_dataset=None, **model_kwargs):
    """Train a :class:`PaletteClassifier` on ``dataset`` (items ``(tokens (H*W,), label)``); returns
    ``(model in eval mode, info dict)`` with the accuracy on ``eval_dataset`` (when given) and the training time."""
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    tokens, labels = _tensors(dataset)
    with torch.random.fork_rng(devices=[]):  # a caller mid-training (the convergence study) keeps its RNG stream
        torch.manual_seed(seed)
        model = PaletteClassifier(dataset.vocab_size, dataset.num_classes, (dataset.height, dataset.width),
                                  **model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(tokens), (batch_size,), generator=g)
        loss = F.cross_entropy(model(tokens[idx])[1], labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        features = torch.cat([model(chunk)[0] for chunk in tokens.split(1024)])
        model.feature_scale.fill_(float(features.square().sum(1).mean() / features.shape[1]) ** -0.5)
    info = {"steps": steps, "train_s": round(time.perf_counter() - t0, 2), "final_loss": float(loss.detach())}
    if eval_dataset is not None:
        info["heldout_accuracy"] = accuracy(model, *_tensors(eval_dataset))
    return model, info


@torch.no_grad()
def accuracy(model: PaletteClassifier, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(tokens)[1].argmax(-1) == labels).float().mean())


def save_classifier(model: PaletteClassifier, path: str, info: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # atomic: concurrent evaluations never read a half-written file
    atomic_save({"kind": "palette_classifier", "config": model.config, "state_dict": model.state_dict(),
                 "info": info or {}}, path)


def load_classifier(path: str) -> PaletteClassifier:
    """A :class:`PaletteClassifier` from a local checkpoint written by :func:`save_classifier` (weights only:
    :func:`models.checkpoint.load_checkpoint`)."""
    obj = load_checkpoint(path, what="classifier weights")
    if not (isinstance(obj, dict) and obj.get("kind") == "palette_classifier"):
        raise CheckpointError(f"{path!r} is not a palette-classifier checkpoint")
    require_keys(obj, path, ["config", "state_dict"], "palette-classifier checkpoint")
    model = PaletteClassifier(**obj["config"])
    model.load_state_dict(obj["state_dict"])
    return model.eval().requires_grad_(False)


def file_digest(path: str, length: int = 12) -> str:
    """Short content hash of a file: cache keys of features depend on the exact extractor weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def classifier_path(cache_dir: str, data: str, grid, seed: int) -> str:
    height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    return os.path.join(cache_dir, f"classifier-{data}-{height}x{width}-seed{seed}.pt")


def builtin_classifier(data: str = "shapes", grid=(8, 8), *, cache_dir: str = os.path.join("runs", "eval"),
                       seed: int = 0, size: int = 8192, steps: int = 400, verbose: bool = True) -> str:
    """Path of the project's classifier for ``data`` at ``grid``: trained on first use (on a split of its own)
    and cached under ``cache_dir``; returns the cached file's path."""
    from ..data.shapes import build_dataset

    path = classifier_path(cache_dir, data, grid, seed)
    if os.path.isfile(path):
        return path
    train_set = build_dataset(data, size=size, grid=grid, seed=seed + CLASSIFIER_SEED_OFFSET)
    eval_set = build_dataset(data, size=1000, grid=grid, seed=seed + 2 * CLASSIFIER_SEED_OFFSET)
    model, info = train_classifier(train_set, eval_dataset=eval_set, steps=steps, seed=seed)
    info.update(data=data, size=size, seed=seed)
    save_classifier(model, path, info)
    if verbose:
        print(f"trained the evaluation classifier ({info}); cached at {path}")
    return path


def images_to_tokens(images: torch.Tensor, palette: torch.Tensor = DEFAULT_PALETTE) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB -> (B, H*W) int64 nearest-palette tokens (exact for palette images)."""
    pixels = images.permute(0, 2, 3, 1).float()
    dist = (pixels[..., None, :] - palette.to(pixels.device).float()).square().sum(-1)
    return dist.argmin(-1).flatten(1)


def _feature_extractor_class():
    """The torch-fidelity extractor class (defined lazily: torch-fidelity is an optional dependency)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor: ``(B, 3, H, W)`` uint8 palette images -> ``(features, logits)`` of a
        :class:`PaletteClassifier` loaded from ``feature_extractor_weights_path`` (a local file; required)."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if not feature_extractor_weights_path:
                raise ValueError(f"{EXTRACTOR_NAME}: pass feature_extractor_weights_path (a local classifier file)")
            self.classifier = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return FEATURES

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, images):
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"{EXTRACTOR_NAME} expects (B, 3, H, W) uint8 images, got "
                                 f"{tuple(images.shape)} {images.dtype}")
            if tuple(images.shape[2:]) != tuple(self.classifier.grid):
                raise ValueError(f"{EXTRACTOR_NAME}: classifier trained on {self.classifier.grid} images, got "
                                 f"{tuple(images.shape[2:])}")
            features, logits = self.classifier(images_to_tokens(images))
            named = {"features": features, "logits": logits}
            return tuple(named[name].double() for name in self.features_list)

    return ClassifierFeatureExtractor


def register_with_torch_fidelity() -> str:
    """Register :class:`ClassifierFeatureExtractor` with torch-fidelity (idempotent); returns its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, _feature_extractor_class())
    return EXTRACTOR_NAME
