"""benchmarks/gpu_suite.sh, checked on CPU: its budgets fit one device command, and its output layout fits what the
device tool returns (at most 8 files; the suite promises at most 4, sizes bounded), in --dry-run and --fake modes."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_suite_pack  # noqa: E402

DEVICE_COMMAND_LIMIT_S = 600  # the device tool's limit for one command
MAX_FILES = 4


def _suite(*args, env=None, timeout=240):
    full_env = {**os.environ, "PY": sys.executable, **(env or {})}
    return subprocess.run(["bash", SUITE, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=ROOT)


def test_dry_run_lists_steps_whose_budgets_fit_one_command():
    out = _suite("--dry-run", env={"OUT": "/nonexistent/never-written"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    total = int(lines[0].split("budgets sum to ")[1].split()[0])
    limit = int(lines[0].split(" s of a ")[1].split()[0])
    assert total <= limit <= 480 < DEVICE_COMMAND_LIMIT_S  # 8 minutes at most, with margin inside the 10
    steps = {line.split()[0]: line for line in lines[2:]}
    for name in ("build", "pytest_gpu", "selftest", "attn_bench", "decode_bench", "foresight_bench", "spec_e2e_bench"):
        assert name in steps, out.stdout
    assert sum(int(line.split()[1].rstrip("s")) for line in lines[2:]) == total
    assert list(steps).index("pytest_gpu") < list(steps).index("attn_bench")  # correctness first
    pytest_line = steps["pytest_gpu"]
    assert "-m gpu" in pytest_line and " -x" not in pytest_line and "--junitxml" in pytest_line
    assert "python " not in out.stdout.replace("$PY", "")  # the device machine has python3, not python
    assert "MIRAI_CUDA=1" in steps["build"]  # the extension is rebuilt there, never carried
    assert "--e2e-windows" in steps["spec_e2e_bench"] and "--no-kernels" in steps["spec_e2e_bench"]


def test_budgets_over_the_limit_refuse_to_run(tmp_path):
    out = _suite("--dry-run", env={"MIRAI_SUITE_BUDGET_pytest_gpu": "900", "OUT": str(tmp_path / "o")})
    assert out.returncode != 0
    out = _suite(env={"MIRAI_SUITE_BUDGET_pytest_gpu": "900", "OUT": str(tmp_path / "o")})
    assert out.returncode == 2 and "limit" in out.stderr
    assert not (tmp_path / "o").exists()


def test_fake_run_layout_outcomes_and_a_timed_out_step(tmp_path):
    out_dir = tmp_path / "out"
    # rope_bench hangs past its 2 s budget: it is recorded as timed out and the steps after it still run.
    out = _suite("--fake", env={"OUT": str(out_dir), "MIRAI_SUITE_BUDGET_rope_bench": "2",
                                "MIRAI_SUITE_FAKE_HANG_rope_bench": "60", "MIRAI_GIT_COMMIT": "f" * 40})
    assert out.returncode == 1, out.stdout + out.stderr  # the planted failing test and the hang
    files = sorted(os.listdir(out_dir))
    assert files == ["logs.tar.gz", "summary.json"] and len(files) <= MAX_FILES
    for name in files:
        assert (out_dir / name).stat().st_size < 1 << 20
    summary = json.loads((out_dir / "summary.json").read_text())
    env = summary["environment"]
    for key in ("date", "device", "torch", "triton", "git_commit", "python"):
        assert key in env, env
    assert env["git_commit"] == "f" * 40
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["rope_bench"]["timed_out"] and steps["rope_bench"]["seconds"] < 30
    assert steps["train_bench"]["rc"] == 0  # ran after the hang
    assert steps["pytest_gpu"]["rc"] == 1
    outcomes = {t["id"].split("::")[-1]: t["outcome"] for t in summary["tests"]}
    assert outcomes == {"test_ok": "passed", "test_bad": "failed", "test_skip": "skipped"}
    assert summary["test_counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert "planted" in next(t for t in summary["tests"] if t["outcome"] == "failed")["message"]
    assert set(summary["benchmarks"]) == {"bench_attn", "bench_foresight", "bench_decode", "bench_spec_e2e",
                                          "bench_train"}
    with tarfile.open(out_dir / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"pytest_gpu.log", "pytest_gpu.xml", "rope_bench.log", "steps.jsonl", "environment.json"} <= names


def test_pack_caps_each_log_and_reads_a_killed_pytest_from_its_log(tmp_path):
    work, out = tmp_path / "w", tmp_path / "o"
    work.mkdir()
    (work / "environment.json").write_text("{}")
    (work / "big.log").write_bytes(b"x" * (gpu_suite_pack.LOG_LIMIT + 12345) + b"\nEND\n")
    # No junit XML (pytest was killed): outcomes come from the -v lines, serial and xdist forms.
    (work / "pytest_gpu.log").write_text("tests/test_a.py::test_one[bf16] PASSED      [ 50%]\n"
                                         "[gw3] [ 75%] FAILED tests/test_b.py::test_two\n")
    gpu_suite_pack.pack(str(work), str(out))
    with tarfile.open(out / "logs.tar.gz") as tar:
        data = tar.extractfile("gpu_suite/big.log").read()
    assert len(data) <= gpu_suite_pack.LOG_LIMIT + 100 and data.endswith(b"END\n") and b"cut" in data[:100]
    tests = json.loads((out / "summary.json").read_text())["tests"]
    assert {t["id"]: t["outcome"] for t in tests} == {"tests/test_a.py::test_one[bf16]": "passed",
                                                       "tests/test_b.py::test_two": "failed"}


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the real run would start")
def test_real_run_without_a_gpu_refuses_and_writes_nothing(tmp_path):
    out = _suite(env={"OUT": str(tmp_path / "o")})
    assert out.returncode == 2 and "no NVIDIA GPU" in out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arg", ["--bogus"])
def test_unknown_argument_is_refused(arg):
    assert _suite(arg).returncode == 2
