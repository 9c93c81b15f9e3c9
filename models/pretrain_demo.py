"""Train the small pre-trained checkpoint that ships with the repo (the main job samples from it at once).

    python -m models.pretrain_demo                  # train (resumable), then write models/pretrained/shapes8-micro/
    python -m models.pretrain_demo --dry-run        # print the exact training command and exit

One documented command, so the shipped file can be retrained at any time (e.g. when the training recipe changes):
``models.train`` with the flags below and the CLI's defaults for everything else. The run works in
``runs/pretrain-demo`` with a checkpoint every 500 steps, so an interrupted run continues where it stopped when the
same command is run again (``--resume`` is passed when ``last.pt`` exists; the resume rules of models.train apply).

Written to ``--dest`` (committed): ``model.pt`` (the EMA weights + config, ~4 MB, loads with
``python -m models.sample --ckpt models/pretrained/shapes8-micro/model.pt``), ``metrics.jsonl`` and ``config.json`` (the
training log and resolved configuration) and ``summary.json`` (the command, wall time, environment and the
structure score of ``--n-check`` samples at CFG 2: the fraction that obey their class's rule; the data scores 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from .cli import positive_int, run_main

# Model micro (d 128, 4 blocks, ~1.05 M parameters: a ~4 MB model.pt) on 8x8 shapes, Mirai-I (the objective that led
# the CPU convergence study, README), lr 2e-3 as in that study.
FLAGS = ["--model", "micro", "--objective", "mirai-i", "--data", "shapes", "--grid", "8", "--batch-size", "32",
         "--lr", "2e-3", "--seed", "0", "--ckpt-every", "500", "--log-every", "50", "--device", "cpu"]


def train_argv(steps: int, work: str, resume: bool) -> list:
    return [*FLAGS, "--steps", str(steps), "--out", work, *(["--resume"] if resume else [])]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=3000)
    p.add_argument("--work", default=os.path.join("runs", "pretrain-demo"), help="training directory (not committed)")
    p.add_argument("--dest", default=os.path.join("models", "pretrained", "shapes8-micro"), help="where the shipped files go")
    p.add_argument("--n-check", type=positive_int, default=200, help="samples scored for summary.json")
    p.add_argument("--dry-run", action="store_true", help="print the training command and exit")
    args = p.parse_args(argv)

    resume = os.path.isfile(os.path.join(args.work, "last.pt"))
    command = [sys.executable, "-m", "models.train", *train_argv(args.steps, args.work, resume)]
    print(" ".join(command), flush=True)
    if args.dry_run:
        return command
    import torch

    from . import train as train_mod
    from .evaluate import class_labels, sample_tokens, structure_metric
    from .nets.gpt import load_sampling_model

    t0 = time.time()
    summary = train_mod.train(train_mod.parse_args(train_argv(args.steps, args.work, resume)))
    train_s = time.time() - t0
    os.makedirs(args.dest, exist_ok=True)
    for name in ("model.pt", "metrics.jsonl", "config.json"):
        shutil.copyfile(os.path.join(args.work, name), os.path.join(args.dest, name))
    model = load_sampling_model(os.path.join(args.dest, "model.pt"))
    labels = class_labels(args.n_check, model.config.num_classes)
    tokens = sample_tokens(model, labels, seed=0, cfg_scale=2.0)
    check = structure_metric(tokens, labels, model.config.grid)
    record = {"command": "python -m models.train " + " ".join(train_argv(args.steps, args.work, False)),
              "steps": args.steps, "train_s_this_invocation": round(train_s, 1), "resumed": resume,
              "final": summary["final"], "step_s_median": summary["step_s_median"],
              "structure_cfg2": {"n": args.n_check, **check}, "git_commit": git_commit(),
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count()}
    with open(os.path.join(args.dest, "summary.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"structure at CFG 2: {check['structure']:.3f} of {args.n_check} samples obey their class's rule "
          f"(the data: 1.000); wrote {args.dest}/")
    return record


if __name__ == "__main__":
    run_main(main, "models.pretrain_demo")
