"""The convergence study: does foresight help, and how fast does it get there? (work in progress: the script runs;
no committed results yet)

    python benchmarks/convergence.py                       # CPU default: 4 objectives x 3 seeds, tiny GPT, 8x8 shapes
    python benchmarks/convergence.py --objectives none mirai-e --seeds 0 --steps 200 --eval-every 100 --n-eval 200

Every objective is trained with identical seeds, data and budget. Every ``--eval-every`` steps its EMA weights are
sampled (``--n-eval`` images, CFG ``--cfg``) and scored by ``models.evaluate.Scorer`` (FID / KID / precision /
recall on the project's classifier features, and the structure metric), beside the data's own floor. Training is
resumed chunk by chunk (``--resume`` is exact), so the schedules are given in steps, not fractions: they are stated in
the output. Writes ``<out>/convergence.json`` (curves, schedules, step times), ``<out>/convergence.md`` (final
metrics, steps to reach the baseline's final FID, step-time overhead) and, with matplotlib, ``<out>/convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models import train as train_mod  # noqa: E402
from models.evaluate import Scorer, class_labels, sample_tokens  # noqa: E402

OBJECTIVES = ("none", "mirai-e", "mirai-i", "mirai-s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="tiny")
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--n-eval", type=int, default=500, help="samples per evaluation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--head-width", type=int, default=None, help="default 4 x dim")
    p.add_argument("--warmup", type=int, default=None, help="foresight warm-up steps (default 5%% of --steps)")
    p.add_argument("--halve-at", type=int, default=None, help="halve λ from this step (default 27%% of --steps)")
    p.add_argument("--ema-decay", type=float, default=None, help="default: half-life 10%% of --steps")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--out", default="runs/convergence")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    out = os.path.join(args.out, f"{objective}-seed{seed}")
    curve, step_times = [], []
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
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
        model = train_mod.load_sampling_model(os.path.join(out, "model.pt"), args.device)
        labels = class_labels(args.n_eval, model.config.num_classes)
        tokens = sample_tokens(model, labels, seed=seed, cfg_scale=args.cfg)
        metrics = scorer.score(tokens.cpu(), labels, seed=seed)
        curve.append({"step": step, "ntp": summary["final"].get("ntp"), **metrics})
        print(f"{objective:<8} seed {seed} step {step:>5}: fid {metrics.get('fid', float('nan')):.3f} "
              f"structure {metrics.get('structure', float('nan')):.3f}", flush=True)
    return {"objective": objective, "seed": seed, "curve": curve, "step_s": statistics.median(step_times)}


def summarise(runs: list[dict], objectives) -> dict:
    """Per objective: mean / spread of each metric per step, and steps to reach the baseline's final mean FID."""
    table = {}
    for objective in objectives:
        mine = [r for r in runs if r["objective"] == objective]
        steps = [p["step"] for p in mine[0]["curve"]]
        fid = [[r["curve"][i]["fid"] for r in mine] for i in range(len(steps))]
        structure = [[r["curve"][i].get("structure", float("nan")) for r in mine] for i in range(len(steps))]
        table[objective] = {
            "steps": steps,
            "fid_mean": [statistics.mean(v) for v in fid],
            "fid_min": [min(v) for v in fid], "fid_max": [max(v) for v in fid],
            "structure_mean": [statistics.mean(v) for v in structure],
            "step_s": statistics.median(r["step_s"] for r in mine),
        }
    if "none" in table:
        target = table["none"]["fid_mean"][-1]
        for row in table.values():
            reached = [s for s, f in zip(row["steps"], row["fid_mean"]) if f <= target]
            row["steps_to_baseline_final_fid"] = reached[0] if reached else None
            row["step_time_vs_none"] = row["step_s"] / table["none"]["step_s"]
    return table


def write_outputs(args, sched, floor, runs, table) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump({"args": vars(args), "schedule": sched, "floor": floor, "runs": runs, "summary": table}, f, indent=1)
    lines = [f"Schedule: warm-up {sched['warmup']} steps, λ halved at {sched['halve_at']}, EMA decay "
             f"{sched['ema_decay']:.5f}; {len(args.seeds)} seeds; {args.n_eval} samples per evaluation; data floor FID "
             f"{floor.get('fid', float('nan')):.3f}, structure {floor.get('structure', float('nan')):.3f}.", "",
             "| objective | final FID (mean, min–max) | final structure | steps to baseline's final FID | step time vs none |",
             "|---|---|---|---|---|"]
    for objective, row in table.items():
        lines.append(f"| {objective} | {row['fid_mean'][-1]:.3f} ({row['fid_min'][-1]:.3f}–{row['fid_max'][-1]:.3f}) "
                     f"| {row['structure_mean'][-1]:.3f} | {row.get('steps_to_baseline_final_fid')} "
                     f"| {row.get('step_time_vs_none', float('nan')):.2f}x |")
    with open(os.path.join(args.out, "convergence.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG plot (pip install -e '.[eval]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for objective, row in table.items():
        ax.plot(row["steps"], row["fid_mean"], label=objective)
        ax.fill_between(row["steps"], row["fid_min"], row["fid_max"], alpha=0.2)
    ax.axhline(floor.get("fid", 0.0), color="gray", linestyle="--", label="data floor")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (classifier features)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "convergence.png"), dpi=120)


def main(argv=None):
    args = parse_args(argv)
    if args.eval_every <= 0 or args.steps % args.eval_every:
        raise SystemExit("--steps must be a positive multiple of --eval-every")
    sched = schedule(args)
    scorer = Scorer("shapes", (args.grid, args.grid))
    floor = scorer.floor(args.n_eval)
    runs = [run_one(args, objective, seed, scorer, sched) for objective in args.objectives for seed in args.seeds]
    table = summarise(runs, args.objectives)
    write_outputs(args, sched, floor, runs, table)
    return table


if __name__ == "__main__":
    main()
