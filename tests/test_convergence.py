"""The convergence study script end to end on a minimal budget (the real study is documented in the README)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import convergence  # noqa: E402


def test_convergence_smoke(tmp_path):
    table = convergence.main(["--objectives", "none", "mirai-s", "--seeds", "0", "--steps", "4", "--eval-every", "2",
                              "--n-eval", "20", "--grid", "8", "--batch-size", "8", "--out", str(tmp_path)])
    assert set(table) == {"none", "mirai-s"}
    assert table["none"]["steps"] == [2, 4] and table["none"]["step_time_vs_none"] == 1.0
    # the baseline reaches its own final FID at the latest at its last evaluation
    assert table["none"]["steps_to_baseline_final_fid"] in (2, 4)
    saved = json.load(open(tmp_path / "convergence.json"))
    assert saved["schedule"]["warmup"] == 0 and len(saved["runs"]) == 2
    assert "| mirai-s |" in open(tmp_path / "convergence.md").read()
