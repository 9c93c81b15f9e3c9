"""Train a LlamaGen-style GPT with or without foresight.

    python -m models.train --model tiny --objective mirai-e --data shapes --steps 300 --out runs/x

A training step is a straight line: batch -> GPT forward (hidden state at block l kept) -> objective (foresight
heads through the fused cosine loss) -> backward -> clip -> AdamW -> EMA refresh. Recipe (MIRAI_SPEC.md): AdamW
betas (0.9, 0.95), weight decay 0.05 on >= 2-D tensors, constant lr, clip 1.0, bf16 autocast on GPU, EMA teacher.

Schedules accept steps (an int) or a fraction of the run (a float < 1): ``--warmup 0.05`` = foresight switched on
after 5% of the steps (the paper: 15 of 300 epochs), ``--halve-at 0.27`` (80 of 300). ``--ema-decay`` defaults to
a half-life of 10% of the run (capped at the paper's 0.9999, which barely moves in a short run: 0.9999^2000 = 0.82).

Multi-process: ``torchrun --nproc_per_node N -m models.train ...`` trains with DistributedDataParallel (NCCL on
GPUs, gloo on CPUs), or FSDP2 with ``--fsdp``; ``--batch-size`` is the global batch, each rank takes its share of every step's batch (a pure
function of seed and step, which is what makes ``--resume`` exact), rank 0 logs and writes checkpoints.

Outputs in ``--out``: ``metrics.jsonl`` (one line per logged step), ``last.pt`` (full state for ``--resume``,
written atomically) and ``model.pt`` (sampling checkpoint: config + EMA weights, no foresight heads; loads strictly
into the plain GPT).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from .checkpoint import CheckpointError, atomic_save, clean_stale_tmp, load_checkpoint, require_keys, truncate_log
from .cli import (UsageError, dropout_rate, float_in, fraction_or_steps, int_at_least, nonneg_float, nonneg_int,
                  positive_float, positive_int, run_main)
from .cli import device, train_seed
from .data import build_dataset
from .encoder import builtin_encoder, load_encoder
from .foresight import EMA, OBJECTIVES, build_objective
from .gpt import GPT, GPTConfig, PRESETS, config_from_preset


def steps_or_fraction(value: str, total_steps: int) -> int:
    number = float(value)
    if number < 0:
        raise ValueError(f"schedule values must be >= 0, got {value}")
    return int(round(number * total_steps)) if number < 1 and "." in value else int(number)


def default_ema_decay(total_steps: int) -> float:
    """A half-life of 10% of the run, capped at the paper's 0.9999."""
    return min(0.9999, 0.5 ** (1.0 / max(1.0, 0.1 * total_steps)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--batch-size", type=positive_int, default=32)
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
    p.add_argument("--head-width", type=positive_int, default=None, help="foresight head width; default 4 x dim")
    p.add_argument("--warmup", default="0.05", type=fraction_or_steps,
                   help="foresight off for these steps (int) or fraction (float)")
    p.add_argument("--halve-at", default="0.27", type=fraction_or_steps,
                   help="halve the foresight weight from here (steps or fraction)")
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
    return p.parse_args(argv)


def param_groups(modules, weight_decay: float):
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
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


def load_sampling_model(path: str, device="cpu") -> GPT:
    """A plain GPT from a sampling checkpoint (``model.pt``) or a training checkpoint (``last.pt``: its EMA),
    read by :func:`models.checkpoint.load_checkpoint` (weights_only; errors name the file)."""
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


class TrainStep(torch.nn.Module):
    """The GPT and the objective's heads as one module, so one DistributedDataParallel wrapper syncs all the
    trainable parameters; ``forward`` is the objective's loss."""

    def __init__(self, model, objective, compile_model: bool = False):
        super().__init__()
        self.model, self.objective = model, objective
        self._forward_model = torch.compile(model) if compile_model else model

    def forward(self, idx, labels, targets, step: int, features=None):
        return self.objective.loss(self._forward_model, idx, labels, targets, step, features)


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


def init_distributed(device_name: str):
    """(rank, world_size, device). Under ``torchrun`` (WORLD_SIZE > 1) joins the process group: NCCL on GPUs,
    gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device_name)
    import torch.distributed as dist

    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


# The flags that fix a run's data order and architecture: a resume must keep them.
RUN_DEFINING = ("seed", "data", "data_size", "grid", "image_size", "code_path", "features_dir", "batch_size", "model",
                "objective")


def _flag(name: str, value) -> str:
    return f"--{name.replace('_', '-')} {value}"


def read_resume_state(path: str, args, total_steps: int) -> dict:
    """``last.pt`` for ``--resume``, checked against this run before anything is written (a refusal leaves the
    run directory as it was): the run must not end before the checkpoint's step (training "back" to an earlier
    step would overwrite later weights with a lower step count, and a later resume would repeat steps), and the
    flags that fix the data order and the model (``RUN_DEFINING``: seed, data, batch size, ...) must be the
    checkpoint's."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: there is no checkpoint to resume from at {path!r} (start without --resume)")
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


def train(args) -> dict:
    rank, world, device = init_distributed(args.device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (global) must divide evenly over {world} processes")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file, not a run directory")
    os.makedirs(args.out, exist_ok=True)
    dataset = build_dataset(args.data, size=args.data_size, grid=args.grid, seed=args.seed, code_path=args.code_path,
                            image_size=args.image_size, features_dir=args.features_dir)
    if args.batch_size > len(dataset):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the dataset ({len(dataset)} images): every "
                         f"step would silently train on a smaller batch than asked")
    last_path = os.path.join(args.out, "last.pt")
    # Checked before anything in --out is written, against the resolved total step count.
    state = read_resume_state(last_path, args, args.steps) if args.resume else None
    if state is None and rank == 0 and os.path.isfile(last_path):
        print(f"models.train: warning: {last_path} of an earlier run will be overwritten by this new run (pass "
              f"--resume to continue that run instead)", file=sys.stderr, flush=True)
    if rank == 0:  # temp files of a writer that was killed mid-save
        for name in ("last.pt", "model.pt"):
            clean_stale_tmp(os.path.join(args.out, name))
    config = config_from_preset(
        args.model, grid=(dataset.height, dataset.width), vocab_size=dataset.vocab_size,
        num_classes=dataset.num_classes, token_dropout_p=args.dropout, resid_dropout_p=args.dropout,
        ffn_dropout_p=args.dropout, class_dropout_prob=args.class_dropout,
    )
    if args.objective != "none" and args.foresight_layer is not None and args.foresight_layer > config.n_layer:
        raise UsageError(f"--foresight-layer {args.foresight_layer}: the {args.model} model has {config.n_layer} "
                         f"blocks (valid: 1..{config.n_layer})")
    model = GPT(config).to(device)
    ema_decay = args.ema_decay if args.ema_decay is not None else default_ema_decay(args.steps)
    ema = EMA(model, ema_decay)
    warmup = steps_or_fraction(args.warmup, args.steps)
    halve_at = steps_or_fraction(args.halve_at, args.steps)
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
        args.objective, model, ema=ema, layer=args.foresight_layer, head_width=args.head_width,
        warmup_steps=warmup, halve_at=halve_at, mirai_s_source=args.mirai_s_source, boundary=args.boundary,
        encoder=encoder, feature_dim=feature_dim,
    ).to(device)
    if args.fsdp:
        if world == 1:
            raise ValueError("--fsdp shards over processes: launch with torchrun --nproc_per_node N (N > 1)")
        if args.resume:
            raise ValueError("--resume is not supported with --fsdp yet (checkpoints are written as full state dicts)")
        shard_for_fsdp(model, ema.model, objective)
    optimizer = torch.optim.AdamW(param_groups([model, objective], args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    step_module = TrainStep(model, objective, args.compile)
    if world > 1 and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_step = state["step"]
    # Dropout streams differ per rank (same weights, different masks), reproducibly.
    if world > 1 and not args.resume:
        torch.manual_seed(args.seed * 1000 + rank)

    schedule = {"ema_decay": ema_decay, "warmup_steps": warmup, "halve_at": halve_at,
                "foresight_layer": getattr(objective, "layer", None), "world_size": world}
    is_main = rank == 0
    if is_main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({"args": vars(args), "gpt": config.__dict__, "schedule": schedule}, f, indent=1)

    def save_full(step):
        if args.fsdp:  # every rank takes part in gathering the shards; rank 0 writes
            state = {"model": full_state_dict(model), "ema": full_state_dict(ema.model),
                     "objective": full_state_dict(objective)}
        else:
            state = {"model": model.state_dict(), "ema": ema.model.state_dict(), "objective": objective.state_dict(),
                     "optimizer": optimizer.state_dict()}
        if is_main:
            atomic_save({"config": config.__dict__, **state, "rng": torch.get_rng_state(), "step": step,
                         "args": vars(args)}, last_path)

    if is_main and args.resume:  # rows a killed run logged after its last checkpoint are logged again below
        truncate_log(os.path.join(args.out, "metrics.jsonl"), start_step)
    log = open(os.path.join(args.out, "metrics.jsonl"), "a" if args.resume else "w") if is_main else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    progress = range(start_step, args.steps)
    if is_main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(progress, initial=start_step, total=args.steps, desc=f"train {args.objective}")
    model.train()
    objective.train()
    metrics, step_times = {}, []
    for step in progress:
        # This rank's share of the global batch: a pure function of (seed, step), so resuming is exact.
        if hasattr(dataset, "set_epoch"):  # seeded crops: a pure function of (seed, epoch, index)
            dataset.set_epoch(step // max(1, len(dataset) // args.batch_size))
        indices = batch_indices(step, args.batch_size, len(dataset), args.seed)[rank::world]
        tokens, labels, features = collate(dataset, indices)
        tokens, labels = tokens.to(device), labels.to(device)
        features = features.to(device) if features is not None else None
        t0 = time.perf_counter()
        with autocast:
            loss, metrics = step_module(tokens[:, :-1], labels, tokens, step, features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over ranks: the gradient of the global-batch mean loss
        grad_norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(objective.parameters()),
                                                   args.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        ema.update(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        global_loss = loss.detach().float()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(global_loss)
            global_loss /= world
        metrics.update(step=step + 1, loss=global_loss.item(), grad_norm=float(grad_norm), step_s=step_times[-1],
                       tokens_per_s=tokens.numel() * world / step_times[-1])
        if is_main and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if not args.no_progress:
                progress.set_postfix(ntp=f"{metrics['ntp']:.3f}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            save_full(step + 1)
    if log is not None:
        log.close()
    save_full(args.steps)
    ema_state = full_state_dict(ema.model) if args.fsdp else ema.model.state_dict()
    if is_main:
        atomic_save({"config": config.__dict__, "model": ema_state}, os.path.join(args.out, "model.pt"))
    steady = step_times[len(step_times) // 5:] or step_times
    return {"final": metrics, "step_s_median": sorted(steady)[len(steady) // 2] if steady else math.nan,
            "schedule": schedule, "out": args.out, "rank": rank, "world_size": world}


def main(argv=None):
    summary = train(parse_args(argv))
    if summary["rank"] != 0:
        return
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}))
    print(f"final: {json.dumps(summary['final'])}")
    print(f"checkpoints: {summary['out']}/last.pt (resume), {summary['out']}/model.pt (sampling)")


if __name__ == "__main__":
    run_main(main, "models.train")
