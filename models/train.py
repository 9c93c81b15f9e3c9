"""Train a LlamaGen-style GPT with or without foresight.

    python -m models.train --model tiny --objective mirai-e --data shapes --steps 300 --out runs/x

A training step is a straight line: batch -> GPT forward (hidden state at block l kept) -> objective (foresight
heads through the fused cosine loss) -> backward -> clip -> AdamW -> EMA refresh. Recipe (docs/method.md): AdamW
betas (0.9, 0.95), weight decay 0.05 on weight matrices only (:func:`param_groups`), constant lr, clip 1.0, bf16
autocast for the student on GPU (teacher / encoder in fp32), EMA teacher. :func:`train` reads as that loop; a step
reads nothing back from the device (no ``.item()``, no synchronize): its metrics stay device tensors until a log
step reads them all at once (:func:`read_step`).

    python -m models.train --recipe paper --model B --objective mirai-e --code-path /codes --print-config

``--recipe paper`` (``--model B|L|XL``, ``--objective none|mirai-e|mirai-i``) resolves to the official
configuration of that run of the paper (:func:`paper_recipe`); flags given explicitly override it. ``--print-config``
prints the resolved configuration as JSON and exits; the same JSON goes into ``config.json``, every checkpoint
(``run_config``) and the first line of ``metrics.jsonl``.

Schedules accept steps (``15``), a fraction of the run (``0.05``) or epochs (``15ep``, as the official scripts; an
epoch is dataset size // global batch steps, drop_last): ``--warmup 0.05`` = foresight switched on after 5% of the
steps, ``--halve-at 80ep`` = the official ``epoch >= 80`` (``0.27`` of a 300-epoch run would land on epoch 81),
``never``; ``--epochs`` sets the run length. Only ``mirai-e`` halves. ``--ema-decay`` defaults to a half-life of
10% of the run (capped at the paper's 0.9999, which barely moves in a short run: 0.9999^2000 = 0.82).

Multi-process: ``torchrun --nproc_per_node N -m models.train ...`` trains with DistributedDataParallel (NCCL on
GPUs, gloo on CPUs), or FSDP2 with ``--fsdp``; ``--batch-size`` is the global batch, each rank takes its share of every step's batch (a pure
function of seed and step, which is what makes ``--resume`` exact), rank 0 logs and writes checkpoints.
``--grad-accum N`` splits each rank's share into N micro-steps (the paper's global batch on fewer GPUs).
Under ``--fsdp`` no rank holds the whole state: checkpoints are sharded (``last.dcp/``, below) and ``--resume``
reloads them, on the same world size bit-exactly, on another one resharded (the dropout streams then restart).

Outputs in ``--out``: ``metrics.jsonl`` (one line per logged step), ``last.pt`` (full state for ``--resume``,
written atomically; under ``--fsdp`` the directory ``last.dcp/`` instead: every rank's shards of the GPT, heads, EMA
and AdamW state through torch.distributed.checkpoint, plus ``meta.pt``: step, every rank's RNG state, the resolved
configuration, AdamW's param groups; written to a temp directory and swapped in) and ``model.pt`` (sampling checkpoint: config + EMA weights, no foresight heads; loads strictly
into the plain GPT).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Optional

import torch

from .checkpoint import (atomic_save, atomic_save_sharded, clean_stale_sharded, clean_stale_tmp, load_checkpoint,
                         load_sharded, load_sharded_meta, recover_sharded, require_keys, truncate_log)
from .cli import (UsageError, dropout_rate, float_in, int_at_least, nonneg_float, nonneg_int, positive_float,
                  positive_int, run_main)
from .cli import device, init_distributed, train_seed
from .data.shapes import build_dataset
from .nets.encoder import builtin_encoder, load_encoder
from .nets.gpt import GPT, GPTConfig, PRESETS, config_from_preset
from .objectives.foresight import EMA, OBJECTIVES, build_objective, default_head_width, read_metrics


NEVER = ("never", "none", "off")


def _schedule_number(text: str):
    """``"15"`` steps (int), ``"0.05"`` a fraction of the run (float), ``"15ep"`` epochs (tuple), ``"never"``."""
    text = str(text).strip().lower()
    if text in NEVER:
        return None
    epochs = re.fullmatch(r"(.+?)\s*(ep|epoch|epochs)", text)
    if epochs:
        number = float(epochs.group(1))
        if number < 0 or not math.isfinite(number):
            raise ValueError(f"an epoch count must be >= 0, got {text!r}")
        return ("epochs", number)
    if "." in text or "e" in text:
        number = float(text)
        if not 0.0 <= number < 1.0:
            raise ValueError(f"a fraction of the run must be in [0, 1), got {text!r}")
        return number
    number = int(text)
    if number < 0:
        raise ValueError(f"a step count must be >= 0, got {text!r}")
    return number


def schedule_value(value: str) -> str:
    """argparse type of the schedule switches (``--warmup``, ``--halve-at``): a step count (``15``), a fraction of
    the run (``0.05``), an epoch count (``15ep``, as the official scripts take them) or ``never``; validated here,
    resolved against the run by :func:`steps_or_fraction`."""
    try:
        _schedule_number(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected steps (15), a fraction of the run (0.05), epochs (15ep) or "
                                         f"'never', got {value!r}: {exc}") from None
    return str(value).strip()


def steps_or_fraction(value: str, total_steps: int, steps_per_epoch: Optional[int] = None) -> Optional[int]:
    """The step a schedule switch resolves to: ``"15"`` -> 15, ``"0.27"`` -> round(0.27 * total_steps),
    ``"80ep"`` -> 80 * steps_per_epoch (the official ``epoch >= 80`` is ``step >= 80 * steps_per_epoch``),
    ``"never"`` -> None."""
    number = _schedule_number(value)
    if number is None or isinstance(number, int):
        return number
    if isinstance(number, tuple):
        if steps_per_epoch is None:
            raise ValueError(f"schedule value {value!r} is in epochs: steps_per_epoch is needed")
        return int(round(number[1] * steps_per_epoch))
    return int(round(number * total_steps))


def default_ema_decay(total_steps: int) -> float:
    """A half-life of 10% of the run, capped at the paper's 0.9999."""
    return min(0.9999, 0.5 ** (1.0 / max(1.0, 0.1 * total_steps)))


RECIPES = ("default", "paper")
BETAS = (0.9, 0.95)  # AdamW betas of LlamaGen and Mirai (not a flag)
PAPER_LAYER = {"B": 8, "L": 16, "XL": 24}  # foresight block l of student and teacher (official scripts / logs)
IMAGENET_TRAIN_IMAGES = 1_281_167  # -> 5004 steps per epoch at batch 256 (drop_last)


def paper_recipe(model: str, objective: str) -> dict:
    """The official Mirai configuration of one run of the paper's table, as train.py flag values (docs/method.md,
    "The official recipe"; the official ``train_c2i_Mirai_{E,I}.py`` defaults and README commands): LlamaGen-B/L/XL
    on ImageNet 256 codes, global batch 256, AdamW lr 1e-4 constant, betas (0.9, 0.95) (fixed in this CLI), wd 0.05
    on weight matrices, clip 1.0, EMA 0.9999 every optimizer step, dropout 0.1 (token, residual, FFN) and class
    dropout 0.1, 300 epochs, bf16 autocast for the student only (fp32 teacher / encoder), TF32 on. Foresight at
    block 8 / 16 / 24 with 2048-wide projectors and λ = 2 per head; Mirai-E: K = 3 at {same, right, below}, warm-up
    15 epochs (hard switch), λ halved from epoch 80; Mirai-I: K = 1, no warm-up, never halved."""
    recipe = dict(data="llamagen-codes", image_size=256, batch_size=256, lr=1e-4, weight_decay=0.05, grad_clip=1.0,
                  dropout=0.1, class_dropout=0.1, ema_decay=0.9999, epochs=300.0, tf32=True, boundary="raster")
    if objective != "none":
        recipe.update(foresight_layer=PAPER_LAYER[model], head_width=2048)
    if objective == "mirai-e":
        recipe.update(warmup="15ep", halve_at="80ep")
    else:
        recipe.update(warmup="0", halve_at="never")
    return recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="default", choices=RECIPES,
                   help="paper: the official configuration of --model B|L|XL with --objective none|mirai-e|mirai-i "
                   "(docs/method.md); any flag given explicitly overrides it. default: the toy CPU defaults below")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved configuration as JSON "
                   "and exit (the same JSON is stored in every checkpoint and atop metrics.jsonl)")
    p.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--objective", default="none", choices=OBJECTIVES)
    p.add_argument("--data", default="shapes", help="shapes (built in), digits (needs scikit-learn) or "
                   "llamagen-codes (with --code-path)")
    p.add_argument("--code-path", default=None, help="llamagen-codes: LlamaGen's extract_codes_c2i.py output dir")
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="llamagen-codes: image size of the code files")
    p.add_argument("--features-dir", default=None, help="llamagen-codes + mirai-i: per-crop encoder features")
    p.add_argument("--data-size", type=positive_int, default=4096, help="shapes: number of training images")
    p.add_argument("--grid", type=int_at_least(2), default=8, help="shapes: image side in tokens")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--epochs", type=float, default=None, help="train this many epochs (steps = epochs x "
                   "dataset size // global batch, drop_last, as the official scripts); overrides --steps")
    p.add_argument("--batch-size", type=positive_int, default=32, help="the global batch (split over torchrun ranks "
                   "and --grad-accum micro-steps)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (fewer GPUs than "
                   "the paper's: the same global batch in pieces)")
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.05)
    p.add_argument("--grad-clip", type=float_in(0.0, lo_open=True, allow_inf=True), default=1.0,
                   help="max global gradient norm (inf: no clipping)")
    p.add_argument("--dropout", type=dropout_rate, default=0.1,
                   help="token / residual / FFN dropout (LlamaGen: 0.1)")
    p.add_argument("--class-dropout", type=dropout_rate, default=0.1, help="label dropout to the null class (CFG)")
    p.add_argument("--ema-decay", type=float_in(0.0, 1.0, hi_open=True), default=None,
                   help="default: half-life of 10%% of the run, <= 0.9999")
    p.add_argument("--foresight-layer", type=positive_int, default=None, help="block l (1-based, <= depth); "
                   "default (unset): round(2/3 depth)")
    p.add_argument("--head-width", type=positive_int, default=None, help="foresight projector width; default "
                   "2048 for dim >= 512 (GPT-B and up, the paper's), 4 x dim below (small CPU presets)")
    p.add_argument("--warmup", default="0.05", type=schedule_value, help="foresight off until here: steps (15), "
                   "fraction of the run (0.05) or epochs (15ep)")
    p.add_argument("--halve-at", default="0.27", type=schedule_value, help="mirai-e only: halve the foresight "
                   "weight from here (steps, fraction, epochs as 80ep, or never); mirai-i / mirai-s never halve")
    p.add_argument("--bf16-teacher", action="store_true", help="speed option, not the paper: run the EMA teacher "
                   "/ Mirai-I encoder under the student's bf16 autocast (default: fp32, autocast off)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="TF32 matmuls and convolutions on CUDA (the official scripts turn it on)")
    p.add_argument("--mirai-s-source", default="teacher", choices=("teacher", "self"))
    p.add_argument("--boundary", default="raster", choices=("raster", "grid"))
    p.add_argument("--encoder", default=None, help="mirai-i: a local encoder file (default: the built-in one, "
                   "trained on first use and cached under runs/encoders/)")
    p.add_argument("--seed", type=train_seed, default=0)
    p.add_argument("--out", default="runs/train")
    p.add_argument("--ckpt-every", type=nonneg_int, default=0,
                   help="write last.pt every N steps (0: only at the end)")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the GPT")
    p.add_argument("--fsdp", action="store_true", help="with torchrun: shard parameters, gradients and optimizer "
                   "state with FSDP2 instead of replicating them with DDP (for L / XL)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    explicit = explicit_flags(p, argv)
    try:
        apply_recipe(args, explicit)
    except ValueError as exc:
        p.error(str(exc))
    if args.grad_accum < 1:
        p.error(f"argument --grad-accum: must be an integer >= 1, got {args.grad_accum}")
    if args.epochs is not None and not args.epochs > 0:
        p.error(f"argument --epochs: must be > 0, got {args.epochs}")
    return args


def explicit_flags(parser: argparse.ArgumentParser, argv=None) -> set:
    """The destinations the command line set explicitly (a second parse with every default suppressed), so a
    recipe fills in only the rest."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


def apply_recipe(args, explicit: set) -> None:
    """Fill ``args`` from ``--recipe`` wherever a flag was not given explicitly; records ``args.explicit``."""
    args.explicit = sorted(explicit - {"recipe", "print_config"})
    if args.recipe == "default":
        return
    if args.model not in PAPER_LAYER:
        raise ValueError(f"--recipe paper trains the paper's models: --model B, L or XL (got {args.model!r})")
    if args.objective not in ("none", "mirai-e", "mirai-i"):
        raise ValueError(f"--recipe paper has no {args.objective!r} run: --objective none, mirai-e or mirai-i")
    preset = paper_recipe(args.model, args.objective)
    if "steps" in explicit and "epochs" not in explicit:
        preset.pop("epochs")  # an explicit step budget replaces the preset's 300 epochs
    for name, value in preset.items():
        if name not in explicit:
            setattr(args, name, value)




def decays(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module``'s own parameter ``name`` is a weight matrix (decayed) rather than a bias or a norm scale
    (not decayed), decided by what it is, not by its rank: the official scripts decay ``p.dim() >= 2`` over
    per-head ``nn.Linear`` projectors, i.e. exactly the Linear / Embedding weights, while our fused
    ``ForesightHeads`` stack the per-head biases into 2-D tensors (``biases_mid``, ``bias_out``)."""
    from mirai_kernels.modules import ForesightHeads

    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd)):
        return name == "weight"
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)) or \
            type(module).__name__.endswith("Norm"):
        return False  # norm scales and shifts
    if isinstance(module, ForesightHeads):
        return name.startswith("weight")  # weight_in, weight_out; bias_in, bias_out
    if isinstance(module, torch.nn.ParameterList):
        raise AssertionError("handled by the owner")  # never reached: see param_groups
    raise ValueError(f"param_groups: no weight-decay rule for parameter {name!r} of {type(module).__name__}; "
                     f"say whether it is a weight matrix in models.train.decays")


def param_groups(modules, weight_decay: float):
    """AdamW groups: weight matrices with ``weight_decay``, everything else (biases, norm scales) without."""
    from mirai_kernels.modules import ForesightHeads

    decay, no_decay, seen = [], [], set()
    for root in modules:
        for _, module in root.named_modules():
            if isinstance(module, torch.nn.ParameterList):
                continue  # its parameters belong to the module that owns the list (named below)
            own = list(module.named_parameters(recurse=False))
            if isinstance(module, ForesightHeads):  # weights_mid.<i>, biases_mid.<i> live in ParameterLists
                own += [(f"{list_name}.{i}", p) for list_name, plist in module.named_children()
                        if isinstance(plist, torch.nn.ParameterList) for i, p in enumerate(plist)]
            for name, param in own:
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                (decay if decays(module, name) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> torch.Tensor:
    """The sample indices of ``step``: a fresh permutation per epoch, a pure function of (seed, step), so a
    resumed run sees exactly the batches it would have seen."""
    per_epoch = max(1, dataset_size // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[offset * batch_size: (offset + 1) * batch_size]


def collate(dataset, indices):
    """(tokens (B, H*W), labels (B,), features (B, H*W, Z) or None)."""
    items = [dataset[int(i)] for i in indices]
    tokens = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items])
    features = torch.stack([item[2] for item in items]) if len(items[0]) > 2 else None
    return tokens, labels, features


class TrainStep(torch.nn.Module):
    """The GPT and the objective's heads as one module, so one DistributedDataParallel wrapper syncs all the
    trainable parameters; ``forward`` is the objective's loss."""

    def __init__(self, model, objective, compile_model: bool = False):
        super().__init__()
        self.model, self.objective = model, objective
        self._forward_model = torch.compile(model) if compile_model else model

    def forward(self, idx, labels, targets, step: int, features=None):
        # loss_terms, not loss: the metrics stay on the device until the log step reads them
        return self.objective.loss_terms(self._forward_model, idx, labels, targets, step, features)


def shard_for_fsdp(model, ema_model, objective) -> None:
    """FSDP2 (``fully_shard``) every block, then the rest, of the GPT and its EMA copy the same way (so the EMA
    refresh is a shard-local lerp), and the foresight heads; a frozen encoder stays replicated."""
    from torch.distributed.fsdp import fully_shard

    for gpt in (model, ema_model):
        for layer in gpt.layers:
            fully_shard(layer)
        fully_shard(gpt)
    if hasattr(objective, "heads"):
        fully_shard(objective.heads)


def full_state_dict(module) -> dict:
    """A module's full (unsharded) state dict on CPU, gathered from every rank (a collective: all ranks call it);
    ranks other than 0 get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resolve_run(args, *, dataset_size: int, grid, vocab_size: int, num_classes: int, world: int,
                dataset_size_assumed: bool = False, objective=None) -> dict:
    """The fully resolved configuration of a run as plain JSON types (``--print-config``, ``config.json``, every
    checkpoint, the first line of ``metrics.jsonl``). Sets ``args.steps`` from ``--epochs``. ``objective``: the
    built objective, whose actual values (e.g. the encoder's feature width) then replace the predicted ones."""
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} (global) must split evenly over {world} process(es) x "
                         f"--grad-accum {args.grad_accum} micro-steps")
    steps_per_epoch = max(1, dataset_size // args.batch_size)  # drop_last, as the official DataLoader
    if args.epochs is not None:
        args.steps = int(round(args.epochs * steps_per_epoch))
    total = args.steps
    gpt = config_from_preset(args.model, grid=grid, vocab_size=vocab_size, num_classes=num_classes,
                             token_dropout_p=args.dropout, resid_dropout_p=args.dropout, ffn_dropout_p=args.dropout,
                             class_dropout_prob=args.class_dropout)

    def epochs_of(step):
        return None if step is None else step / steps_per_epoch

    foresight = None
    if args.objective != "none":
        warmup = steps_or_fraction(args.warmup, total, steps_per_epoch)
        if warmup is None:
            raise ValueError("--warmup never would keep foresight off for the whole run; use --objective none")
        if args.objective == "mirai-i":
            warmup = 0  # Mirai-I has no warm-up (the objective takes none)
        halve = steps_or_fraction(args.halve_at, total, steps_per_epoch) if args.objective == "mirai-e" else None
        offsets = [[0, 0], [0, 1], [1, 0]] if args.objective == "mirai-e" else [[0, 0]]
        z_dim = gpt.dim if args.objective in ("mirai-e", "mirai-s") else (768 if args.recipe == "paper" else None)
        if objective is not None:
            z_dim = objective.heads.z_dim
        foresight = {
            "layer": args.foresight_layer or max(1, round(2 * gpt.n_layer / 3)),
            "head_width": args.head_width or default_head_width(gpt.dim), "head_depth": 3,
            "K": len(offsets), "offsets": offsets, "raster_offsets": [dy * gpt.grid[1] + dx for dy, dx in offsets],
            "lambda": [2.0] * len(offsets), "z_dim": z_dim, "boundary": args.boundary if args.objective == "mirai-e"
            else "raster", "align_prefix": args.objective != "mirai-i",
            "warmup_steps": warmup, "warmup_epochs": epochs_of(warmup),
            "halve_at_step": halve if halve is not None and halve < total else None,
            "halve_at_epoch": epochs_of(halve) if halve is not None and halve < total else None,
            "halve_requested": args.halve_at if args.objective == "mirai-e" else "never (mirai-e only)",
            "target": {"mirai-e": "EMA teacher, eval mode, true labels, raw layer-l state",
                       "mirai-i": (f"features from {args.features_dir}" if args.features_dir else
                                   f"encoder {args.encoder}" if args.encoder else "built-in token encoder"),
                       "mirai-s": f"bidirectional block-l output ({args.mirai_s_source})"}[args.objective],
        }
    return {
        "recipe": args.recipe, "model": args.model, "objective": args.objective, "explicit_flags": args.explicit,
        "gpt": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(gpt).items()},
        "data": {"name": args.data, "code_path": args.code_path, "image_size": args.image_size,
                 "size": dataset_size, "size_assumed": dataset_size_assumed, "steps_per_epoch": steps_per_epoch},
        "batch": {"global": args.batch_size, "world_size": world, "grad_accum": args.grad_accum,
                  "per_rank_micro_batch": args.batch_size // (world * args.grad_accum)},
        "optimizer": {"name": "AdamW", "lr": args.lr, "lr_schedule": "constant", "betas": list(BETAS),
                      "weight_decay": args.weight_decay, "decayed": "weight matrices only (no biases, no norms)",
                      "grad_clip": args.grad_clip},
        "ema": {"decay": args.ema_decay if args.ema_decay is not None else default_ema_decay(total),
                "every": "optimizer step"},
        "steps": total, "epochs": total / steps_per_epoch,
        "foresight": foresight,
        "precision": {"student": "bf16 autocast on CUDA (fp32 on CPU)",
                      "targets": "student autocast (--bf16-teacher)" if args.bf16_teacher else "fp32, autocast off",
                      "tf32": bool(args.tf32)},
        "seed": args.seed,
    }


def switch_summary(cfg: dict) -> str:
    """One line with the resolved step of every schedule switch (printed at the start of a run)."""
    spe = cfg["data"]["steps_per_epoch"]
    text = (f"schedule: {cfg['steps']} steps = {cfg['epochs']:g} epochs of {spe} steps (global batch "
            f"{cfg['batch']['global']} = {cfg['batch']['world_size']} rank(s) x {cfg['batch']['grad_accum']} "
            f"micro-step(s) x {cfg['batch']['per_rank_micro_batch']}); EMA decay {cfg['ema']['decay']:g}")
    fs = cfg["foresight"]
    if fs is not None:
        halve = ("never" if fs["halve_at_step"] is None else
                 f"from step {fs['halve_at_step']} (epoch {fs['halve_at_epoch']:g})")
        text += (f"; foresight at block {fs['layer']}, {fs['K']} head(s) {fs['head_width']} wide, on from step "
                 f"{fs['warmup_steps']} (epoch {fs['warmup_epochs']:g}), λ halved {halve}")
    return text


# The flags that fix a run's data order and architecture: a resume must keep them.
RUN_DEFINING = ("seed", "data", "data_size", "grid", "image_size", "code_path", "features_dir", "batch_size", "model",
                "objective")


def _flag(name: str, value) -> str:
    return f"--{name.replace('_', '-')} {value}"


def read_resume_state(path: str, args, total_steps: int) -> dict:
    """``last.pt`` for ``--resume`` (under ``--fsdp``: ``last.dcp``'s ``meta.pt``; the shards are loaded once the
    model is sharded, :func:`restore_sharded`), checked against this run before anything is written (a refusal
    leaves the run directory as it was): the run must not end before the checkpoint's step (training "back" to an
    earlier step would overwrite later weights with a lower step count, and a later resume would repeat steps), and
    the flags that fix the data order and the model (``RUN_DEFINING``: seed, data, batch size, ...) must be the
    checkpoint's."""
    sharded = path.endswith(".dcp")
    if not os.path.exists(path):
        other = os.path.join(os.path.dirname(path), "last.pt" if sharded else "last.dcp")
        if os.path.exists(other):
            raise UsageError(f"--resume{' --fsdp' if sharded else ''}: there is no {os.path.basename(path)} in "
                             f"{os.path.dirname(path)!r} but {other!r}, a "
                             + ("full checkpoint of a run without --fsdp: resume it without --fsdp" if sharded else
                                "sharded checkpoint of an --fsdp run: resume it with --fsdp (under torchrun)"))
        raise UsageError(f"--resume: there is no checkpoint to resume from at {path!r} (start without --resume)")
    if sharded:
        state = require_keys(load_sharded_meta(path, what="--resume checkpoint"), path,
                             ["rng", "rng_per_rank", "step", "optimizer_param_groups"],
                             "sharded training checkpoint (last.dcp)")
    else:
        state = require_keys(load_checkpoint(path, what="--resume checkpoint"), path,
                             ["model", "ema", "objective", "optimizer", "rng", "step"], "training checkpoint (last.pt)")
    step = int(state["step"])
    if total_steps < step:
        raise UsageError(f"--resume with --steps {total_steps}: {path} is already at step {step}. Training to an "
                         f"earlier step would overwrite its later weights under a lower step count (and a later "
                         f"resume would repeat steps), so nothing was done and {path} is untouched: pass --steps >= "
                         f"{step} to continue, or another --out to start a new run.")
    saved = state.get("args") or {}
    changed = [name for name in RUN_DEFINING if name in saved and saved[name] != getattr(args, name, None)]
    if changed:
        asked = ", ".join(_flag(name, getattr(args, name, None)) for name in changed)
        had = ", ".join(_flag(name, saved[name]) for name in changed)
        raise UsageError(f"--resume: this run asks for {asked} but {path} was written with {had}. These fix the data "
                         f"order and the model, so the resumed run would silently differ from the one it continues; "
                         f"nothing was done and {path} is untouched: resume with {had}, or use another --out.")
    return state


@dataclasses.dataclass
class Run:
    """What :func:`prepare_run` fixes before a model exists: this process's place, the data, the resolved
    configuration, the output paths and the checkpoint being resumed (``None`` for a new run)."""

    rank: int
    world: int
    device: torch.device
    dataset: object
    run_config: dict
    gpt_config: GPTConfig
    last_path: str
    state: Optional[dict]
    schedule: Optional[dict] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class Parts:
    """The trained pieces (:func:`build_parts`): the GPT, its EMA, the objective (heads, teacher hooks), the
    optimizer over both and ``step_module``, the module a step calls (DDP-wrapped when several processes replicate)."""

    model: GPT
    ema: EMA
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_module: torch.nn.Module


def prepare_run(args, rank: int, world: int, device: torch.device) -> Run:
    """Checks, dataset, resolved configuration (sets ``args.steps`` from ``--epochs``) and the resume checkpoint,
    all before anything in ``--out`` is written (a refusal leaves the run directory as it was)."""
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (global) must divide evenly over {world} processes")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file, not a run directory")
    os.makedirs(args.out, exist_ok=True)
    dataset = build_dataset(args.data, size=args.data_size, grid=args.grid, seed=args.seed, code_path=args.code_path,
                            image_size=args.image_size, features_dir=args.features_dir)
    run_config = resolve_run(args, dataset_size=len(dataset), grid=(dataset.height, dataset.width),
                             vocab_size=dataset.vocab_size, num_classes=dataset.num_classes, world=world)
    if args.batch_size > len(dataset):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the dataset ({len(dataset)} images): every "
                         f"step would silently train on a smaller batch than asked")
    last_path = checkpoint_path(args)
    if args.fsdp and args.resume:  # a writer killed between the two renames of its swap: the previous one back
        if rank == 0:
            recover_sharded(last_path)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    # Checked before anything in --out is written, against the resolved total step count.
    state = read_resume_state(last_path, args, args.steps) if args.resume else None
    if state is None and rank == 0 and os.path.exists(last_path):
        print(f"models.train: warning: {last_path} of an earlier run will be overwritten by this new run (pass "
              f"--resume to continue that run instead)", file=sys.stderr, flush=True)
    if rank == 0:  # temp files of a writer that was killed mid-save
        for name in ("last.pt", "model.pt"):
            clean_stale_tmp(os.path.join(args.out, name))
        if args.fsdp:
            clean_stale_sharded(last_path)
    if args.tf32 and device.type == "cuda":  # the official scripts run with TF32 matmuls / convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = GPTConfig(**{k: tuple(v) if k == "grid" else v for k, v in run_config["gpt"].items()})
    if args.objective != "none" and args.foresight_layer is not None and args.foresight_layer > config.n_layer:
        raise UsageError(f"--foresight-layer {args.foresight_layer}: the {args.model} model has {config.n_layer} "
                         f"blocks (valid: 1..{config.n_layer})")
    return Run(rank, world, device, dataset, run_config, config, last_path, state)


def build_parts(args, run: Run) -> Parts:
    """The GPT (seeded: identical on every rank), its EMA, the objective (and the Mirai-I encoder), then the
    process layout: FSDP2 shards (``--fsdp``) or DDP replicates; the optimizer sees the parameters as they are
    trained. Re-resolves ``run.run_config`` against the built objective."""
    dataset, device = run.dataset, run.device
    model = GPT(run.gpt_config).to(device)
    ema = EMA(model, run.run_config["ema"]["decay"])
    foresight_cfg = run.run_config["foresight"] or {}
    encoder, feature_dim = None, None
    if args.objective == "mirai-i":
        if args.features_dir:
            feature_dim = dataset[0][2].shape[-1]
        elif args.encoder:
            encoder = load_encoder(args.encoder)
        else:
            cache = os.path.join("runs", "encoders", f"{args.data}-{args.grid}-{args.data_size}-seed{args.seed}.pt")
            encoder = builtin_encoder(dataset, cache, seed=args.seed)
    objective = build_objective(
        args.objective, model, ema=ema, layer=foresight_cfg.get("layer"), head_width=foresight_cfg.get("head_width"),
        warmup_steps=foresight_cfg.get("warmup_steps", 0), halve_at=foresight_cfg.get("halve_at_step"),
        mirai_s_source=args.mirai_s_source, boundary=args.boundary, encoder=encoder, feature_dim=feature_dim,
        teacher_autocast=args.bf16_teacher,
    ).to(device)
    run.run_config = resolve_run(args, dataset_size=len(dataset), grid=(dataset.height, dataset.width),
                                 vocab_size=dataset.vocab_size, num_classes=dataset.num_classes, world=run.world,
                                 objective=objective)
    if args.fsdp:
        if run.world == 1:
            raise ValueError("--fsdp shards over processes: launch with torchrun --nproc_per_node N (N > 1)")
        shard_for_fsdp(model, ema.model, objective)
    optimizer = torch.optim.AdamW(param_groups([model, objective], args.weight_decay), lr=args.lr, betas=BETAS)
    step_module = TrainStep(model, objective, args.compile)
    if run.world > 1 and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    return Parts(model, ema, objective, optimizer, step_module)


def restore(args, run: Run, parts: Parts) -> int:
    """Load the resumed checkpoint into ``parts`` and set this rank's RNG stream; returns the first step to train.
    Dropout streams differ per rank (same weights, different masks), reproducibly; a resume restores each rank's
    own stream (checkpoints of a multi-process run hold one per rank), else every rank would draw rank 0's masks."""
    state, world, rank = run.state, run.world, run.rank
    start_step = 0
    if state is not None and args.fsdp:  # the shards, resharded by DCP if the world size changed
        restore_sharded(run, parts, state)
        start_step = state["step"]
    elif state is not None:
        parts.model.load_state_dict(state["model"])
        parts.ema.model.load_state_dict(state["ema"])
        parts.objective.load_state_dict(state["objective"])
        parts.optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
    per_rank = state.get("rng_per_rank") if state is not None else None
    if state is not None and per_rank is not None and len(per_rank) == world:
        torch.set_rng_state(per_rank[rank])
    elif state is not None and world == 1:
        torch.set_rng_state(state["rng"])
    else:
        if state is not None:  # another world size than the checkpoint's: exact continuation is impossible
            print(f"models.train: warning: {run.last_path} was written by {len(per_rank) if per_rank else 1} "
                  f"process(es), this run has {world}: the dropout streams restart from the seed, so the resumed "
                  f"run is not bit-exact with an uninterrupted one", file=sys.stderr, flush=True)
        torch.manual_seed(args.seed * 1000 + rank if world > 1 else args.seed)
    return start_step


def schedule_of(run: Run, parts: Parts) -> dict:
    foresight_cfg = run.run_config["foresight"] or {}
    return {"ema_decay": run.run_config["ema"]["decay"], "warmup_steps": foresight_cfg.get("warmup_steps", 0),
            "halve_at": foresight_cfg.get("halve_at_step"), "foresight_layer": getattr(parts.objective, "layer", None),
            "world_size": run.world}


def open_log(args, run: Run, start_step: int):
    """Rank 0: ``config.json``, the switch summary, and ``metrics.jsonl`` headed by the resolved configuration
    (again at each resume: it may differ); on resume, rows a killed run logged after its last checkpoint are cut
    (they are logged again). Other ranks: ``None``."""
    if not run.is_main:
        return None
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"resolved": run.run_config, "args": vars(args), "gpt": run.gpt_config.__dict__,
                   "schedule": run.schedule}, f, indent=1)
    print(switch_summary(run.run_config), flush=True)
    path = os.path.join(args.out, "metrics.jsonl")
    if args.resume:
        truncate_log(path, start_step)
    log = open(path, "a" if args.resume else "w")
    log.write(json.dumps({"config": run.run_config, **({"resumed_at_step": start_step} if args.resume else {})})
              + "\n")
    log.flush()
    return log


def save_checkpoint(args, run: Run, parts: Parts, step: int) -> None:
    """Everything ``--resume`` needs, atomically: ``last.pt`` (rank 0 writes the full state), or under FSDP the
    sharded ``last.dcp/`` (:func:`save_sharded`). A collective in a multi-process run: every rank calls it (every
    rank's RNG state is gathered)."""
    rng = torch.get_rng_state()
    info = {"config": run.gpt_config.__dict__, "rng": rng, "step": step, "args": vars(args),
            "run_config": run.run_config}
    if run.world > 1:
        import torch.distributed as dist

        rng_per_rank = [None] * run.world
        dist.all_gather_object(rng_per_rank, rng)
        info["rng_per_rank"] = rng_per_rank
    if args.fsdp:
        save_sharded(run, parts, info)
    elif run.is_main:
        model, ema, objective = parts.model, parts.ema, parts.objective
        atomic_save({"config": info.pop("config"), "model": model.state_dict(), "ema": ema.model.state_dict(),
                     "objective": objective.state_dict(), "optimizer": parts.optimizer.state_dict(), **info},
                    run.last_path)


def checkpoint_path(args) -> str:
    """``OUT/last.pt`` (one file, rank 0's full state), or ``OUT/last.dcp`` under ``--fsdp`` (a DCP directory:
    every rank writes its own shards; no rank ever holds the whole model)."""
    return os.path.join(args.out, "last.dcp" if args.fsdp else "last.pt")


def sharded_state(parts: Parts):
    """FSDP: ``({"trained": GPT + objective, "ema": EMA GPT, "optimizer": AdamW state}, AdamW param_groups)``, the
    tensors as this rank's DTensor shards keyed by parameter name (what DCP saves and reshards), the
    param_groups (plain values) apart: they go into ``meta.pt``, not through DCP's pickles."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    trained, optim = get_state_dict(trained_modules(parts), parts.optimizer)
    return {"trained": trained, "ema": get_model_state_dict(parts.ema.model), "optimizer": optim["state"]}, \
        optim["param_groups"]


def trained_modules(parts: Parts) -> torch.nn.Module:
    """The GPT and the objective under one root (the optimizer's parameters, named ``model.*`` / ``objective.*``)."""
    return torch.nn.ModuleDict({"model": parts.model, "objective": parts.objective})


def save_sharded(run: Run, parts: Parts, info: dict) -> None:
    """``last.dcp/``: the shards through torch.distributed.checkpoint, ``info`` and the optimizer's param_groups
    as ``meta.pt`` (weights_only-loadable), written atomically (:func:`models.checkpoint.atomic_save_sharded`)."""
    tensors, param_groups = sharded_state(parts)
    atomic_save_sharded(tensors, {**info, "optimizer_param_groups": param_groups, "world_size": run.world},
                        run.last_path)


def restore_sharded(run: Run, parts: Parts, meta: dict) -> None:
    """Load ``last.dcp/`` into the freshly sharded ``parts`` (any world size: DCP reshards)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    tensors, _ = sharded_state(parts)  # the structure to fill (AdamW's state initialised by a zero-lr step)
    load_sharded(tensors, run.last_path, what="--resume checkpoint")
    set_state_dict(trained_modules(parts), parts.optimizer, model_state_dict=tensors["trained"],
                   optim_state_dict={"state": tensors["optimizer"], "param_groups": meta["optimizer_param_groups"]})
    set_model_state_dict(parts.ema.model, tensors["ema"])


def save_sampling_model(args, run: Run, parts: Parts) -> None:
    """``model.pt``: config + EMA weights, no foresight heads (a collective under FSDP; rank 0 writes)."""
    ema_state = full_state_dict(parts.ema.model) if args.fsdp else parts.ema.model.state_dict()
    if run.is_main:
        atomic_save({"config": run.gpt_config.__dict__, "model": ema_state, "run_config": run.run_config},
                    os.path.join(args.out, "model.pt"))


def step_batches(args, run: Run, step: int):
    """This rank's share of step ``step``'s global batch, a pure function of (seed, step) (what makes a resume
    exact), as ``--grad-accum`` micro-batches ``(tokens, labels, features)`` on the device, loaded lazily (one
    micro-batch at a time, as the step consumes them)."""
    dataset = run.dataset
    if hasattr(dataset, "set_epoch"):  # seeded crops: a pure function of (seed, epoch, index)
        dataset.set_epoch(step // max(1, len(dataset) // args.batch_size))
    indices = batch_indices(step, args.batch_size, len(dataset), args.seed)[run.rank::run.world]
    for micro_indices in indices.chunk(args.grad_accum):
        tokens, labels, features = collate(dataset, micro_indices)
        yield tuple(None if t is None else to_device(t, run.device) for t in (tokens, labels, features))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host sync: a plain ``.to("cuda")`` of pageable memory waits for the copy (and so
    for the queued step); pinned memory lets it queue like a kernel (the caching host allocator keeps the pinned
    buffer alive until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def train_step(args, parts: Parts, batches, step: int, autocast) -> dict:
    """One optimizer step: zero grads -> ``--grad-accum`` micro-steps (forward under the student's autocast,
    backward of loss / A; DDP syncs gradients on the last one only) -> clip -> AdamW -> EMA refresh. Nothing is
    read back to the host: returns the step's metrics as device tensors (:func:`read_step`)."""
    step_module = parts.step_module
    parts.optimizer.zero_grad(set_to_none=True)
    # The rank's share in equal micro-batches, each loss / A, gradients summed: the gradient of the mean over the
    # share, as one micro-step would give; DDP averages over ranks: the gradient of the global-batch mean loss.
    loss, micro_metrics, tokens_seen = 0.0, [], 0
    for micro, (tokens, labels, features) in enumerate(batches):
        last_micro = micro == args.grad_accum - 1
        sync = contextlib.nullcontext() if last_micro or not hasattr(step_module, "no_sync") else \
            step_module.no_sync()
        with sync:
            with autocast:
                micro_loss, micro_m = step_module(tokens[:, :-1], labels, tokens, step, features)
            (micro_loss / args.grad_accum).backward()
        loss = loss + micro_loss.detach() / args.grad_accum
        micro_metrics.append(micro_m)
        tokens_seen += tokens.numel()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(parts.model.parameters()) + list(parts.objective.parameters()),
                                               args.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    parts.optimizer.step()
    parts.ema.update(parts.model)
    return {"loss": loss, "micro_metrics": micro_metrics, "grad_norm": grad_norm, "tokens": tokens_seen}


def student_autocast(device: torch.device):
    """bf16 autocast for the student on CUDA; fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def read_step(pending: dict, step: int, world: int, step_s: float) -> dict:
    """The log row of a step from :func:`train_step`'s device tensors, read to the host at once (the only host
    sync of a logged step): the objective's metrics (this rank's, averaged over micro-steps), the loss (averaged
    over ranks: a collective, so every rank calls it at the same steps), the global gradient norm and timing."""
    global_loss = pending["loss"].detach().float()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(global_loss)
        global_loss /= world
    *micro_metrics, scalars = read_metrics([*pending["micro_metrics"],
                                            {"loss": global_loss, "grad_norm": pending["grad_norm"]}])
    metrics = {k: (sum(m[k] for m in micro_metrics) / len(micro_metrics) if isinstance(v, float) else v)
               for k, v in micro_metrics[0].items()}
    metrics.update(step=step + 1, loss=scalars["loss"], grad_norm=scalars["grad_norm"], step_s=step_s,
                   tokens_per_s=pending["tokens"] * world / step_s)
    return metrics


class StepTimer:
    """Wall time per step without a per-step device sync: steps run asynchronously on a GPU, so the device is
    synchronized only when a time is read (:meth:`interval`, at the log steps) and the time is the mean over the
    steps since the previous read (with ``--log-every 1``: the step's own time). Time spent outside the steps
    (logging, checkpoints, which synchronize themselves) is not counted."""

    def __init__(self, device: torch.device):
        self.device, self.elapsed, self.steps, self.per_step = device, 0.0, 0, []

    @contextlib.contextmanager
    def step(self, read: bool):
        start = time.perf_counter()
        yield
        if read and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.elapsed += time.perf_counter() - start
        self.steps += 1

    def interval(self) -> float:
        mean = self.elapsed / max(1, self.steps)
        self.per_step += [mean] * self.steps
        self.elapsed, self.steps = 0.0, 0
        return mean

    def median(self) -> float:
        """Median seconds per step past the first 20% of the steps (compilation, allocator warm-up)."""
        steady = self.per_step[len(self.per_step) // 5:] or self.per_step
        return sorted(steady)[len(steady) // 2] if steady else math.nan


def progress_bar(args, run: Run, start_step: int):
    steps = range(start_step, args.steps)
    if not run.is_main or args.no_progress:
        return steps
    from tqdm import tqdm

    return tqdm(steps, initial=start_step, total=args.steps, desc=f"train {args.objective}")


def train(args) -> dict:
    """Train as ``args`` says (the module docstring); returns a summary (the last logged metrics, the median step
    time, the schedule). Every rank of a torchrun job calls it."""
    run = prepare_run(args, *init_distributed(args.device))
    parts = build_parts(args, run)
    start_step = restore(args, run, parts)
    run.state = None  # loaded: free its copy of the weights
    run.schedule = schedule_of(run, parts)
    log = open_log(args, run, start_step)
    timer, metrics, autocast = StepTimer(run.device), {}, student_autocast(run.device)
    parts.model.train()
    parts.objective.train()
    progress = progress_bar(args, run, start_step)
    for step in progress:
        logged = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        with timer.step(read=logged):
            pending = train_step(args, parts, step_batches(args, run, step), step, autocast)
        if logged:  # the only host reads of the loop (every rank: the loss is averaged over ranks)
            metrics = read_step(pending, step, run.world, timer.interval())
            if log is not None:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if not args.no_progress:
                    progress.set_postfix(ntp=f"{metrics['ntp']:.3f}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            save_checkpoint(args, run, parts, step + 1)
    if log is not None:
        log.close()
    save_checkpoint(args, run, parts, args.steps)
    save_sampling_model(args, run, parts)
    return {"final": metrics, "step_s_median": timer.median(), "schedule": run.schedule, "out": args.out,
            "rank": run.rank, "world_size": run.world}


def print_config(args) -> dict:
    """``--print-config``: the resolved configuration without training (nothing is built but the dataset index;
    ``llamagen-codes`` without ``--code-path`` assumes ImageNet's 1,281,167 training images at 16x downsampling,
    marked ``size_assumed``). The world size is torchrun's ``WORLD_SIZE`` (1 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.data == "llamagen-codes" and not args.code_path:
        side = args.image_size // 16
        info = dict(dataset_size=IMAGENET_TRAIN_IMAGES, grid=(side, side), vocab_size=16384, num_classes=1000,
                    dataset_size_assumed=True)
    else:
        dataset = build_dataset(args.data, size=args.data_size, grid=args.grid, seed=args.seed,
                                code_path=args.code_path, image_size=args.image_size, features_dir=args.features_dir)
        info = dict(dataset_size=len(dataset), grid=(dataset.height, dataset.width), vocab_size=dataset.vocab_size,
                    num_classes=dataset.num_classes)
    return resolve_run(args, world=world, **info)


def main(argv=None):
    args = parse_args(argv)
    if args.print_config:
        print(json.dumps(print_config(args), indent=1))
        return
    summary = train(args)
    if summary["rank"] != 0:
        return
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}))
    print(f"final: {json.dumps(summary['final'])}")
    print(f"checkpoints: {summary['out']}/last.pt (resume), {summary['out']}/model.pt (sampling)")


if __name__ == "__main__":
    run_main(main, "models.train")
