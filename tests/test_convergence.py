"""The convergence study: its script end to end on a minimal budget, its summary arithmetic, and the committed CPU
study replayed (the first evaluation of its baseline and of Mirai-E must land within the committed seed spread)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import convergence  # noqa: E402

COMMITTED = os.path.join(ROOT, "benchmarks", "results", "convergence_cpu", "convergence.json")


def test_convergence_smoke(tmp_path):
    table = convergence.main(["--objectives", "none", "mirai-s", "--seeds", "0", "--steps", "4", "--eval-every", "2",
                              "--n-eval", "20", "--grid", "8", "--batch-size", "8", "--out", str(tmp_path)])
    assert set(table) == {"none", "mirai-s"}
    assert table["none"]["steps"] == [2, 4] and table["none"]["step_time_vs_none"] == 1.0
    # the baseline reaches its own final FID at the latest at its last evaluation
    assert table["none"]["steps_to_baseline_final_fid"] in (2, 4)
    saved = json.load(open(tmp_path / "convergence.json"))
    assert saved["schedule"]["warmup"] == 0 and len(saved["runs"]) == 2
    assert saved["command"].startswith("python benchmarks/convergence.py --objectives none mirai-s")
    assert saved["environment"]["torch"] and saved["wall_s"] > 0
    assert "| mirai-s |" in open(tmp_path / "convergence.md").read()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_after_replays_a_prefix(tmp_path):
    table = convergence.main(["--objectives", "none", "--seeds", "0", "--steps", "6", "--eval-every", "2",
                              "--stop-after", "2", "--n-eval", "20", "--batch-size", "8", "--out", str(tmp_path)])
    assert table["none"]["steps"] == [2]
    # the schedule is the whole run's, not the prefix's
    assert json.load(open(tmp_path / "convergence.json"))["schedule"]["ema_decay"] == \
        convergence.schedule(convergence.parse_args(["--steps", "6"]))["ema_decay"]


def _run(objective, seed, curve, step_s=1.0):
    keys = ("fid", "kid_mean", "precision", "recall", "structure", "ntp")
    return {"objective": objective, "seed": seed, "step_s": step_s,
            "curve": [{"step": s, **{k: v for k in keys}} for s, v in curve]}


def test_summary_speedup_and_spread():
    runs = [_run("none", 0, [(100, 10.0), (200, 6.0)]), _run("none", 1, [(100, 12.0), (200, 8.0)]),
            _run("mirai-e", 0, [(100, 7.0), (200, 4.0)], 2.0), _run("mirai-e", 1, [(100, 6.0), (200, 5.0)], 2.0),
            _run("mirai-s", 0, [(100, 20.0), (200, 9.0)]), _run("mirai-s", 1, [(100, 30.0), (200, 8.0)])]
    table = convergence.summarise(runs, ["none", "mirai-e", "mirai-s"])
    assert table["none"]["fid_mean"] == [11.0, 7.0] and table["none"]["fid_min"] == [10.0, 6.0]
    assert math.isclose(table["none"]["fid_std"][0], math.sqrt(2.0))
    # baseline's final mean FID is 7.0: Mirai-E is there at step 100 (6.5), i.e. 2x faster; Mirai-S never (8.5)
    assert table["mirai-e"]["steps_to_baseline_final_fid"] == 100
    assert table["mirai-e"]["speedup_to_baseline_final_fid"] == 2.0
    assert table["mirai-e"]["step_time_vs_none"] == 2.0
    assert table["mirai-s"]["steps_to_baseline_final_fid"] is None
    assert table["none"]["speedup_to_baseline_final_fid"] == 1.0
    text = convergence.markdown(convergence.parse_args(["--seeds", "0", "1"]), {"warmup": 1, "halve_at": 2,
                                "ema_decay": 0.9}, {"fid": 0.1}, table)
    assert "| mirai-e | 4.500 (4.000–5.000) |" in text and "not reached in 200" in text


@pytest.mark.skipif(not os.path.isfile(COMMITTED), reason="no committed CPU study")
@pytest.mark.parametrize("objective", ["none", "mirai-e"])
def test_committed_study_reproduces(tmp_path, objective):
    """Replay seed 0 of the committed study up to its first evaluation: each headline metric must land within the
    committed seed spread at that step (max - min over seeds, at least 10% of the value: other CPUs round
    differently, and training amplifies that)."""
    saved = json.load(open(COMMITTED))
    a = saved["args"]
    first = a["eval_every"]
    argv = ["--objectives", objective, "--seeds", "0", "--model", a["model"], "--grid", str(a["grid"]),
            "--steps", str(a["steps"]), "--eval-every", str(first), "--stop-after", str(first),
            "--n-eval", str(a["n_eval"]), "--batch-size", str(a["batch_size"]), "--lr", repr(a["lr"]),
            "--cfg", repr(a["cfg"]), "--device", "cpu", "--out", str(tmp_path)]
    for flag in ("head_width", "warmup", "halve_at", "ema_decay"):
        if a.get(flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(a[flag])]
    # The replay runs the study's own command in a child process, with this machine's default arithmetic (AVX-512
    # row kernels where the CPU has them, as the study was recorded).
    script = os.path.join(ROOT, "benchmarks", "convergence.py")
    subprocess.run([sys.executable, script, *argv], check=True, cwd=ROOT, capture_output=True)
    replay = json.load(open(tmp_path / "convergence.json"))["summary"][objective]
    committed = saved["summary"][objective]
    at = committed["steps"].index(first)
    seed0 = next(r for r in saved["runs"] if r["objective"] == objective and r["seed"] == 0)["curve"][at]
    for metric in ("fid", "precision", "recall", "ntp"):
        spread = committed[f"{metric}_max"][at] - committed[f"{metric}_min"][at]
        tolerance = max(spread, 0.1 * abs(seed0[metric]))
        got = replay[f"{metric}_mean"][0]
        assert abs(got - seed0[metric]) <= tolerance, (objective, metric, got, seed0[metric], tolerance)
