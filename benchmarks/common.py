"""The benchmark harness: time providers side by side in one run, ratios against a named baseline, memory, JSON.

A benchmark script builds a list of :class:`Case` (one shape / setting each) and, per case, a dict of providers
``name -> zero-argument callable`` (or ``None`` plus a reason when a provider cannot run here: it is reported as
skipped, never silently replaced). :func:`run_cases` times every provider, prints a table with the ratio
``baseline_time / provider_time`` first (> 1 means faster than the baseline), and :func:`write_json` records the
results with the environment (device, torch / triton / CUDA versions, git commit, date).

Timing: on GPU, ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median); on CPU,
``torch.utils.benchmark.Timer.blocked_autorange`` (median), with ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Make `python benchmarks/<name>.py` work from a checkout without installing, like the tests do.
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@dataclasses.dataclass
class Case:
    """One benchmarked setting: a name, its parameters, and optional FLOP / byte counts for rates."""

    name: str
    params: dict
    flops: Optional[float] = None  # per call, for TFLOP/s
    bytes: Optional[float] = None  # per call, for GB/s


Provider = Optional[Callable[[], object]]


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="CPU: seconds of timing per measurement")
    parser.add_argument("--warmup", type=int, default=25, help="GPU: warm-up time in ms for do_bench")
    parser.add_argument("--rep", type=int, default=100, help="GPU: measurement time in ms for do_bench")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's choice)")
    return parser


def setup_from_args(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def time_ms(fn: Callable[[], object], device: torch.device, args) -> float:
    """Median milliseconds per call of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))
    from torch.utils import benchmark

    fn()  # warm-up: first-call allocation, lazy imports, kernel compilation
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=args.min_run_time).median * 1e3


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak allocated bytes above the starting point during one call (GPU only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - start)


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of tensors that autograd saves for backward during one call of ``fn`` (a forward), counted by
    storage so views of one buffer count once. Works on every device."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def run_cases(cases, make_providers, *, baseline: str, device: torch.device, args, memory=None) -> list[dict]:
    """Time every provider of every case. ``make_providers(case)`` returns ``{name: callable | (None, reason)}``;
    ``memory(case, name, fn)`` optionally returns a dict of memory figures to record."""
    results = []
    for case in cases:
        providers = make_providers(case)
        row = {"case": case.name, "params": case.params, "providers": {}}
        for name, fn in providers.items():
            entry = {}
            if fn is None or isinstance(fn, tuple):
                entry["skipped"] = fn[1] if isinstance(fn, tuple) else "not available here"
            else:
                try:
                    entry["ms"] = time_ms(fn, device, args)
                    if case.flops:
                        entry["tflops"] = case.flops / (entry["ms"] * 1e-3) / 1e12
                    if case.bytes:
                        entry["gbps"] = case.bytes / (entry["ms"] * 1e-3) / 1e9
                    if memory is not None:
                        entry.update(memory(case, name, fn) or {})
                except Exception as exc:  # one failing provider must not hide the others' numbers
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["providers"][name] = entry
        base = row["providers"].get(baseline, {}).get("ms")
        for entry in row["providers"].values():
            if base and "ms" in entry:
                entry["speedup_vs_baseline"] = base / entry["ms"]
        results.append(row)
        print_row(row, baseline)
    return results


def print_row(row: dict, baseline: str) -> None:
    print(f"\n{row['case']}  {json.dumps(row['params'])}")
    for name, entry in row["providers"].items():
        if "ms" in entry:
            ratio = entry.get("speedup_vs_baseline")
            extra = "".join(
                f"  {label} {entry[key]:.{digits}f}"
                for key, label, digits in (("tflops", "TFLOP/s", 3), ("gbps", "GB/s", 1))
                if key in entry
            )
            extra += "".join(f"  {k} {v / 2**20:.1f} MiB" for k, v in entry.items() if k.endswith("_bytes"))
            ratio_text = f"{ratio:5.2f}x" if ratio else "   -  "
            print(f"  {ratio_text} vs {baseline:<14} {name:<28} {entry['ms']:10.3f} ms{extra}")
        else:
            print(f"    skip                   {name:<28} {entry.get('skipped') or entry.get('error')}")


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["git_commit"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True, text=True).stdout
        env["git_dirty"] = bool(dirty.strip())
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    return env


def write_json(path: Optional[str], benchmark: str, args, device: torch.device, results: list[dict], notes=None):
    if not path:
        return
    # The exact command (thread-count variables included), so anyone can rerun it; the load average says how busy
    # the (shared) machine was while it ran.
    threads_env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ]
    env = environment(device)
    if hasattr(os, "getloadavg"):
        env["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "benchmark": benchmark,
        "command": " ".join(threads_env + ["python"] + sys.argv),
        "environment": env,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "notes": notes or {},
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"\nwrote {path}")
