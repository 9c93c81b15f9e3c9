"""Training objectives, selectable by name: ``none``, ``mirai-e``, ``mirai-s`` (and ``mirai-i`` with an encoder).

Each objective is an ``nn.Module`` holding its training-only parts (foresight heads, EMA teacher hooks) with

* ``loss(model, idx, labels, targets, step) -> (loss, metrics)`` — one straight line: GPT forward (hidden state at
  block ``l`` kept) -> targets -> heads through the fused cosine loss; the metrics as Python numbers;
* ``loss_terms(...)``, the same with the metrics left on the device (no host sync; the training loop's call, read
  by :func:`read_metrics` at its log interval);

Schedule (docs/method.md, "Loss schedule"): ``loss = NTP + c(step) * sum_k lambda_k * L_k``; ``c`` is 0 during the warm-up (a hard
switch; the heads stay in the graph with a zero-valued term, as DDP requires) and halves from ``halve_at`` on —
for Mirai-E only: the official Mirai-I keeps its multiplier at 1.0 in both branches, so ``mirai-i`` (and our
``mirai-s``) never halve, whatever ``halve_at`` says.

Precision (the official scripts): the student runs under the caller's autocast (bf16 on GPU); the targets — the
EMA teacher's pass and the frozen Mirai-I encoder — are computed in fp32 with autocast switched off, so they are not
rounded to bf16. ``teacher_autocast=True`` (``--bf16-teacher``) lets them run under the caller's autocast instead: a
speed option, not the paper.

Projector width: 2048 (``Linear d->2048, SiLU, 2048->2048, SiLU, 2048->z``, the paper's and the official code's) for
every model with ``d >= 512`` (GPT-B/L/XL); the small CPU presets scale it as ``4 * d`` (micro 512, tiny 1024, small
1536): :func:`default_head_width`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import mirai_kernels as mk

OBJECTIVES = ("none", "mirai-e", "mirai-s", "mirai-i")
PAPER_HEAD_WIDTH = 2048


def default_head_width(dim: int) -> int:
    """The foresight projector width: the paper's 2048 for ``dim >= 512`` (GPT-B and up), ``4 * dim`` below
    (a scaled rule for the small CPU presets only, so their heads stay proportionate to the model)."""
    return min(PAPER_HEAD_WIDTH, 4 * dim)


class EMA:
    """Exponential moving average of a model's parameters (buffers copied), refreshed after each optimizer step.
    ``model`` is the EMA copy: eval mode, no grad. It is the Mirai-E / Mirai-S teacher and the sampling model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if hasattr(self.model, "reshard"):  # FSDP2 leaves a root unsharded after a no-grad (teacher) forward
            self.model.reshard()
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if hasattr(p, "to_local"):  # FSDP2: both sharded alike, so the refresh is shard-local
                ema_p.to_local().lerp_(p.detach().to_local(), 1.0 - self.decay)
            else:
                ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def foresight_scale(step: int, warmup_steps: int, halve_at: Optional[int]) -> float:
    """``c(step)``: 0 before ``warmup_steps``, 1 after, 0.5 from ``halve_at`` on."""
    if step < warmup_steps:
        return 0.0
    return 0.5 if halve_at is not None and step >= halve_at else 1.0


class Objective(nn.Module):
    name = "none"

    def __init__(self, model, *, ema: Optional[EMA] = None):
        super().__init__()
        self.config = model.config
        self.ema = ema

    def loss(self, model, idx, labels, targets, step: int, features=None):
        """``(loss, metrics)`` with the metrics as Python numbers (read to the host at once: one sync)."""
        loss, metrics = self.loss_terms(model, idx, labels, targets, step, features)
        return loss, read_metrics([metrics])[0]

    def loss_terms(self, model, idx, labels, targets, step: int, features=None):
        """``(loss, metrics)`` with no host sync: the metrics are detached device tensors (or Python numbers), read
        by :func:`read_metrics` when they are logged (the training loop reads them only at its log interval)."""
        _, loss = model(idx, labels, targets)
        return loss, {"ntp": loss.detach()}


class ForesightObjective(Objective):
    """Shared machinery: K foresight heads on the state after block ``layer``, weighted by ``head_weights``."""

    def __init__(self, model, *, ema, offsets, layer: int, head_width: int, head_weights, warmup_steps: int,
                 halve_at: Optional[int], z_dim: int, boundary: str = "raster", align_prefix: bool = True,
                 teacher_autocast: bool = False):
        super().__init__(model, ema=ema)
        self.teacher_autocast = teacher_autocast
        config = model.config
        if not 1 <= layer <= config.n_layer:
            raise ValueError(f"foresight layer must be in [1, {config.n_layer}], got {layer}")
        self.layer, self.warmup_steps, self.halve_at = layer, warmup_steps, halve_at
        self.heads = mk.ForesightHeads(
            config.dim, z_dim, offsets, grid=config.grid, prefix=config.cls_token_num, boundary=boundary,
            align_prefix=align_prefix, head_weights=head_weights, hidden=head_width,
        )

    def targets(self, model, student_out, idx, labels, tokens, features=None) -> torch.Tensor:
        """Sequence-indexed ``(B, prefix + N - 1, Z)`` targets (no grad). ``features``: precomputed
        patch-indexed encoder features ``(B, H*W, Z)`` from the data, when it has them (Mirai-I)."""
        raise NotImplementedError

    def target_precision(self, device_type: str):
        """The context the targets are computed in: autocast off (fp32 teacher / encoder, as the official code),
        unless ``teacher_autocast`` keeps the caller's autocast."""
        return contextlib.nullcontext() if self.teacher_autocast else torch.autocast(device_type, enabled=False)

    def loss_terms(self, model, idx, labels, targets, step: int, features=None):
        logits, ntp, extras = model(idx, labels, targets, **self.student_kwargs())
        out = {"logits": logits, "loss": ntp, **extras}
        with torch.no_grad(), self.target_precision(idx.device.type):
            feature_targets = self.targets(model, out, idx, labels, targets, features)
        total, per_head = self.heads(out["hidden"], feature_targets)
        scale = foresight_scale(step, self.warmup_steps, self.halve_at)
        loss = out["loss"] + scale * total
        # "head": the (K,) per-head losses, read as head0, head1, ... (read_metrics)
        metrics = {"ntp": out["loss"].detach(), "foresight": total.detach(), "foresight_scale": scale,
                   "head": per_head.detach()}
        metrics.update(self.extra_metrics(out, feature_targets))
        return loss, metrics

    def extra_metrics(self, student_out, feature_targets) -> dict:
        return {}

    def student_kwargs(self) -> dict:
        return {"hidden_layer": self.layer}


class MiraiE(ForesightObjective):
    """Explicit foresight: the EMA teacher's own raw layer-``l`` states (true labels, eval mode, no grad, run only
    up to block ``l``) at offsets {same, right, below}, paired with the student's layer-``l`` states."""

    name = "mirai-e"

    def __init__(self, model, *, ema, layer, head_width, warmup_steps, halve_at, head_weight: float = 2.0,
                 offsets=((0, 0), (0, 1), (1, 0)), boundary: str = "raster", teacher_autocast: bool = False):
        super().__init__(model, ema=ema, offsets=list(offsets), layer=layer, head_width=head_width,
                         head_weights=[head_weight] * len(offsets), warmup_steps=warmup_steps, halve_at=halve_at,
                         z_dim=model.config.dim, boundary=boundary, teacher_autocast=teacher_autocast)

    def targets(self, model, student_out, idx, labels, tokens, features=None):
        return self.ema.model(idx, labels, stop_at=self.layer, hidden_layer=self.layer)[2]["hidden"].float()


class MiraiS(ForesightObjective):
    """Implicit foresight from the shared bidirectional pass: block ``l``'s output recomputed with the bidirectional
    attention output (stop-gradient) is the target of the causal state at the same position. ``source="teacher"``
    takes it from the EMA teacher's pass; ``"self"`` from the model's own pass (no extra forward; watch
    ``cos_causal_bidir`` for collapse)."""

    name = "mirai-s"

    def __init__(self, model, *, ema, layer, head_width, warmup_steps, head_weight: float = 2.0,
                 offsets=((0, 0),), source: str = "teacher", teacher_autocast: bool = False):
        if source not in ("teacher", "self"):
            raise ValueError(f"mirai-s source must be 'teacher' or 'self', got {source!r}")
        # An implicit (bidirectional) target like Mirai-I's, so no halving either.
        super().__init__(model, ema=ema, offsets=list(offsets), layer=layer, head_width=head_width,
                         head_weights=[head_weight] * len(offsets), warmup_steps=warmup_steps, halve_at=None,
                         z_dim=model.config.dim, teacher_autocast=teacher_autocast)
        self.source = source

    def student_kwargs(self) -> dict:
        kwargs = {"hidden_layer": self.layer}
        if self.source == "self":
            kwargs["dual_layer"] = self.layer
        return kwargs

    def targets(self, model, student_out, idx, labels, tokens, features=None):
        if self.source == "self":
            return student_out["bidir_hidden"].detach().float()
        _, _, extras = self.ema.model(idx, labels, stop_at=self.layer, dual_layer=self.layer)
        return extras["bidir_hidden"].float()

    def extra_metrics(self, student_out, feature_targets) -> dict:
        return {"cos_causal_bidir": cosine_causal_bidirectional(student_out["hidden"], feature_targets)}


class MiraiI(ForesightObjective):
    """Implicit foresight from a frozen bidirectional encoder: its feature of grid cell ``j`` (it has seen the whole
    image) is the target of the student state that consumed ``z_j``; one head at offset 0, the class position not
    aligned, no warm-up and no halving (the official Mirai-I: its multiplier is 1.0 in both branches)."""

    name = "mirai-i"

    def __init__(self, model, *, encoder: Optional[nn.Module], layer, head_width, head_weight: float = 2.0,
                 warmup_steps: int = 0, z_dim: Optional[int] = None, teacher_autocast: bool = False):
        if encoder is None and z_dim is None:
            raise ValueError("mirai-i needs a frozen encoder, or z_dim when the data carries precomputed features")
        if z_dim is None:
            probe = torch.zeros(1, model.config.block_size, dtype=torch.long)
            with torch.no_grad():
                z_dim = encoder(probe).shape[-1]
        super().__init__(model, ema=None, offsets=[0], layer=layer, head_width=head_width,
                         head_weights=[head_weight], warmup_steps=warmup_steps, halve_at=None, z_dim=z_dim,
                         align_prefix=False, teacher_autocast=teacher_autocast)
        self.encoder = encoder.eval().requires_grad_(False) if encoder is not None else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: never dropout / batch-stat updates
        return self

    def targets(self, model, student_out, idx, labels, tokens, features=None):
        if features is None:
            if self.encoder is None:
                raise ValueError("mirai-i without an encoder needs precomputed features from the data")
            features = self.encoder(tokens)
        features = features.float()  # (B, H*W, Z), patch-indexed
        return mk.grid_to_sequence(features, prefix=self.config.cls_token_num)


def build_objective(name: str, model, *, ema: Optional[EMA], layer: Optional[int] = None,
                    head_width: Optional[int] = None, warmup_steps: int = 0, halve_at: Optional[int] = None,
                    mirai_s_source: str = "teacher", boundary: str = "raster",
                    encoder: Optional[nn.Module] = None, feature_dim: Optional[int] = None,
                    teacher_autocast: bool = False) -> Objective:
    """Build an objective by name. ``layer`` defaults to round(2/3 of the depth) (8 / 16 / 24 for GPT-B / L / XL);
    ``head_width`` to :func:`default_head_width` (2048 for GPT-B and up). ``halve_at`` acts on ``mirai-e`` only."""
    config = model.config
    layer = layer or max(1, round(2 * config.n_layer / 3))
    head_width = head_width or default_head_width(config.dim)
    if name == "none":
        return Objective(model)
    if name == "mirai-i":
        if encoder is None and feature_dim is None:
            raise ValueError("mirai-i needs a frozen encoder (see models.nets.encoder) or precomputed features")
        return MiraiI(model, encoder=encoder, layer=layer, head_width=head_width, z_dim=feature_dim,
                      teacher_autocast=teacher_autocast)
    if ema is None:
        raise ValueError(f"{name} needs an EMA teacher")
    common = dict(ema=ema, layer=layer, head_width=head_width, warmup_steps=warmup_steps,
                  teacher_autocast=teacher_autocast)
    if name == "mirai-e":
        return MiraiE(model, boundary=boundary, halve_at=halve_at, **common)
    if name == "mirai-s":
        return MiraiS(model, source=mirai_s_source, **common)
    raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")


def cosine_causal_bidirectional(hidden: torch.Tensor, bidir_hidden: torch.Tensor) -> torch.Tensor:
    """Mean cosine between causal and bidirectional states (Mirai-S collapse monitor: 1.0 = collapsed), a 0-d
    tensor on their device (no host sync)."""
    return F.cosine_similarity(hidden.detach().float(), bidir_hidden.float(), dim=-1).mean()


def read_metrics(rows: list) -> list:
    """Objective metrics (``loss_terms``) as Python numbers, every tensor of every row read to the host in one
    transfer per device (one sync). A 0-d tensor becomes a float; a 1-d one named ``key`` becomes ``key0``,
    ``key1``, ... in its place (the per-head losses: ``head0``...); Python numbers pass through. The floats are
    exactly the tensors' values (``.item()``'s)."""
    tensors = [v for row in rows for v in row.values() if isinstance(v, torch.Tensor)]
    by_device = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    values = {}
    for group in by_device.values():  # float64 holds every fp32 / bf16 / fp16 value exactly
        flat = torch.cat([t.detach().reshape(-1).double() for t in group]).tolist()
        offset = 0
        for t in group:
            values[id(t)] = flat[offset: offset + t.numel()]
            offset += t.numel()
    out = []
    for row in rows:
        read = {}
        for key, v in row.items():
            if not isinstance(v, torch.Tensor):
                read[key] = v
            elif v.dim() == 0:
                read[key] = values[id(v)][0]
            else:
                read.update({f"{key}{k}": x for k, x in enumerate(values[id(v)])})
        out.append(read)
    return out
