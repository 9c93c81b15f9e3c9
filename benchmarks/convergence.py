"""The convergence study: does foresight help, and how fast does it get there?

    python benchmarks/convergence.py            # CPU default (~20 min on 2 cores): 4 objectives x 3 seeds, micro GPT
    python benchmarks/convergence.py --objectives none mirai-e --seeds 0 --steps 200 --eval-every 100 --n-eval 200
    python benchmarks/convergence.py --device cuda --model small --grid 16 --steps 4000 --eval-every 500 \\
        --n-eval 5000 --batch-size 128 --lr 1e-3   # a bigger run for a GPU

Every objective is trained with identical seeds, data and budget. Every ``--eval-every`` steps its EMA weights are
sampled (``--n-eval`` images, CFG ``--cfg``) and scored by ``models.evaluate.Scorer`` (FID / KID / precision /
recall on the project's classifier features, and the structure metric), beside the data's own floor. Training is
resumed chunk by chunk (``--resume`` is exact), so the schedules are resolved to steps of the whole run up front and
stated in the output; ``--stop-after`` replays a prefix of a study (the first chunks are identical). Writes
``<out>/convergence.json`` (command, environment, schedules, every run's curve and step time, the summary),
``<out>/convergence.md`` (final metrics with seed spread, steps to reach the baseline's final FID and the implied
speed-up, step-time overhead) and, with matplotlib, ``<out>/convergence.png`` (FID and structure vs step, one line
per objective, seed min-max shaded). The classifier behind the metrics and the Mirai-I encoder are trained on first
use and cached under ``runs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import environment  # noqa: E402
from models import train as train_mod  # noqa: E402
from models.evaluate import Scorer, class_labels, sample_tokens  # noqa: E402
from models.nets.gpt import load_sampling_model  # noqa: E402

OBJECTIVES = ("none", "mirai-e", "mirai-i", "mirai-s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="micro")
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=125)
    p.add_argument("--stop-after", type=int, default=None,
                   help="train and evaluate only up to this step of the --steps schedule (spot checks of a study)")
    p.add_argument("--n-eval", type=int, default=1000, help="samples per evaluation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--head-width", type=int, default=None, help="default 4 x dim")
    p.add_argument("--warmup", type=int, default=None, help="foresight warm-up steps (default 5%% of --steps)")
    p.add_argument("--halve-at", type=int, default=None, help="halve λ from this step (default 27%% of --steps)")
    p.add_argument("--ema-decay", type=float, default=None, help="default: half-life 10%% of --steps")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--out", default="runs/convergence", help="results: convergence.json / .md / .png")
    p.add_argument("--work-dir", default=None, help="checkpoints of every run (default <out>/runs; resumable; "
                   "keep it out of version control)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--render", action="store_true",
                   help="train nothing: rewrite <out>/convergence.md and .png from <out>/convergence.json")
    return p.parse_args(argv)


def schedule(args) -> dict:
    """The training CLI's defaults, resolved to steps for the whole run (chunks resume with these fixed values)."""
    defaults = train_mod.parse_args([])
    return {
        "warmup": args.warmup if args.warmup is not None else train_mod.steps_or_fraction(defaults.warmup, args.steps),
        "halve_at": (args.halve_at if args.halve_at is not None
                     else train_mod.steps_or_fraction(defaults.halve_at, args.steps)),
        "ema_decay": args.ema_decay if args.ema_decay is not None else train_mod.default_ema_decay(args.steps),
    }


def run_one(args, objective: str, seed: int, scorer: Scorer, sched: dict) -> dict:
    out = os.path.join(args.work_dir or os.path.join(args.out, "runs"), f"{objective}-seed{seed}")
    curve, step_times = [], []
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(args.eval_every, last + 1, args.eval_every):
        train_args = train_mod.parse_args([
            "--model", args.model, "--objective", objective, "--grid", str(args.grid), "--steps", str(step),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed), "--out", out,
            "--warmup", str(sched["warmup"]), "--halve-at", str(sched["halve_at"]),
            "--ema-decay", repr(sched["ema_decay"]), "--device", args.device, "--no-progress",
            "--log-every", str(args.eval_every),
            *(["--head-width", str(args.head_width)] if args.head_width else []),
            *(["--resume"] if step > args.eval_every else []),
        ])
        summary = train_mod.train(train_args)
        step_times.append(summary["step_s_median"])
        model = load_sampling_model(os.path.join(out, "model.pt"), args.device)
        labels = class_labels(args.n_eval, model.config.num_classes)
        tokens = sample_tokens(model, labels, seed=seed, cfg_scale=args.cfg)
        metrics = scorer.score(tokens.cpu(), labels, seed=seed)
        curve.append({"step": step, "ntp": summary["final"].get("ntp"), **metrics})
        print(f"{objective:<8} seed {seed} step {step:>5}: fid {metrics.get('fid', float('nan')):.3f} "
              f"structure {metrics.get('structure', float('nan')):.3f}", flush=True)
    return {"objective": objective, "seed": seed, "curve": curve, "step_s": statistics.median(step_times)}


METRICS = ("fid", "kid_mean", "precision", "recall", "structure", "ntp")  # curves kept per objective (seed mean / min / max / std)


def _stats(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and v == v]
    if not finite:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "std": float("nan")}
    return {"mean": statistics.mean(finite), "min": min(finite), "max": max(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}


def summarise(runs: list[dict], objectives) -> dict:
    """Per objective: seed mean / min / max / std of each metric at each evaluation, the step time, and (with the
    ``none`` baseline present) the first evaluation whose mean FID reaches the baseline's final mean FID -- the
    paper's "N x faster" is the baseline's step count over that one."""
    table = {}
    for objective in objectives:
        mine = [r for r in runs if r["objective"] == objective]
        steps = [p["step"] for p in mine[0]["curve"]]
        row = {"steps": steps, "seeds": [r["seed"] for r in mine],
               "step_s": statistics.median(r["step_s"] for r in mine)}
        for metric in METRICS:
            per_step = [_stats([r["curve"][i].get(metric) for r in mine]) for i in range(len(steps))]
            for stat in ("mean", "min", "max", "std"):
                row[f"{metric}_{stat}"] = [p[stat] for p in per_step]
        table[objective] = row
    if "none" in table:
        baseline = table["none"]
        target = baseline["fid_mean"][-1]
        for row in table.values():
            reached = [s for s, f in zip(row["steps"], row["fid_mean"]) if f <= target]
            row["steps_to_baseline_final_fid"] = reached[0] if reached else None
            row["speedup_to_baseline_final_fid"] = baseline["steps"][-1] / reached[0] if reached else None
            row["step_time_vs_none"] = row["step_s"] / baseline["step_s"]
    return table


def _fmt(row: dict, metric: str, digits: int = 3) -> str:
    mean, lo, hi = row[f"{metric}_mean"][-1], row[f"{metric}_min"][-1], row[f"{metric}_max"][-1]
    return f"{mean:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def markdown(args, sched, floor, table) -> str:
    final = table[next(iter(table))]["steps"][-1]
    lines = [
        f"Model `{args.model}` on {args.grid}x{args.grid} `shapes`, batch {args.batch_size}, lr {args.lr}, {final} steps; "
        f"foresight warm-up {sched['warmup']} steps, λ halved at step {sched['halve_at']}, EMA decay "
        f"{sched['ema_decay']:.5f}; seeds {', '.join(map(str, args.seeds))}; {args.n_eval} samples per evaluation "
        f"(CFG {args.cfg}). Metrics at step {final}: seed mean (min–max). Data floor (training split vs held-out, "
        f"same n): FID {floor.get('fid', float('nan')):.3f}, precision {floor.get('precision', float('nan')):.3f}, "
        f"recall {floor.get('recall', float('nan')):.3f}, structure {floor.get('structure', float('nan')):.3f}.",
        "",
        "| objective | FID ↓ | KID ↓ | precision ↑ | recall ↑ | structure ↑ | steps to baseline's final FID "
        "| speed-up | step time vs none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for objective, row in table.items():
        reached = row.get("steps_to_baseline_final_fid")
        speedup = row.get("speedup_to_baseline_final_fid")
        lines.append(
            f"| {objective} | {_fmt(row, 'fid')} | {_fmt(row, 'kid_mean')} | {_fmt(row, 'precision')} "
            f"| {_fmt(row, 'recall')} | {_fmt(row, 'structure')} "
            f"| {reached if reached is not None else f'not reached in {final}'} "
            f"| {f'{speedup:.2f}x' if speedup else '–'} | {row.get('step_time_vs_none', float('nan')):.2f}x |")
    return "\n".join(lines) + "\n"


def plot(path: str, table: dict, floor: dict) -> bool:
    """FID and structure vs step, one line per objective (seed mean), the seed min–max shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "fid", "FID (classifier features) ↓"), (axes[1], "structure", "structure ↑")):
        for objective, row in table.items():
            line, = ax.plot(row["steps"], row[f"{metric}_mean"], marker="o", label=objective)
            ax.fill_between(row["steps"], row[f"{metric}_min"], row[f"{metric}_max"], color=line.get_color(),
                            alpha=0.2)
        # the data floor is far off these curves' scale on a short run: named in the title, not drawn
        ax.set_title(f"data floor: {floor.get(metric, float('nan')):.3f}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(title="seed mean, min–max shaded", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: str, args, sched: dict, floor: dict, table: dict) -> None:
    """``<out>/convergence.md`` (also printed) and ``<out>/convergence.png``."""
    text = markdown(args, sched, floor, table)
    with open(os.path.join(out, "convergence.md"), "w") as f:
        f.write(text)
    print(text)
    plot(os.path.join(out, "convergence.png"), table, floor)


def write_outputs(args, sched, floor, runs, table, wall_s: float | None = None, command: str | None = None) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump({"command": command, "args": vars(args), "schedule": sched,
                   "environment": environment(torch.device(args.device)), "wall_s": wall_s, "floor": floor,
                   "runs": runs, "summary": table}, f, indent=1)
    write_report(args.out, args, sched, floor, table)


def render(out: str) -> dict:
    """The table and plot of a saved study, recomputed from its runs (the JSON is left as it is)."""
    with open(os.path.join(out, "convergence.json")) as f:
        saved = json.load(f)
    args = argparse.Namespace(**saved["args"])
    table = summarise(saved["runs"], args.objectives)
    write_report(out, args, saved["schedule"], saved["floor"], table)
    return table


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render(args.out)
    if args.eval_every <= 0 or args.steps % args.eval_every:
        raise SystemExit("--steps must be a positive multiple of --eval-every")
    started = time.perf_counter()
    sched = schedule(args)
    scorer = Scorer("shapes", (args.grid, args.grid))
    floor = scorer.floor(args.n_eval)
    runs = [run_one(args, objective, seed, scorer, sched) for objective in args.objectives for seed in args.seeds]
    table = summarise(runs, args.objectives)
    command = "python benchmarks/convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_outputs(args, sched, floor, runs, table, wall_s=time.perf_counter() - started, command=command.strip())
    return table


if __name__ == "__main__":
    main()
