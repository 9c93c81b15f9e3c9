"""Packs the GPU suite's scratch directory into its few result files (called by ``benchmarks/gpu_suite.sh`` after
every step, so a run killed mid-step still leaves everything finished before it). Standard library only.

    python3 benchmarks/gpu_suite_pack.py environment WORK          # once, first: WORK/environment.json
    python3 benchmarks/gpu_suite_pack.py pack WORK OUT              # WORK -> OUT/summary.json + OUT/logs.tar.gz

``OUT`` then holds exactly two files (the device tool returns at most 8; ``tests/test_gpu_suite.py`` pins this):

* ``summary.json`` — ``environment`` (device, driver, python, torch, CUDA, triton, git commit, date), ``steps``
  (name, budget, exit code, seconds, timed out), ``tests`` (every test of ``pytest -m gpu`` with its outcome and,
  for failures, the first lines of the message), ``test_counts``, ``benchmarks`` (each benchmark's own JSON,
  whole) and ``selftest`` (``python -m mirai_kernels.selftest``'s JSON).
* ``logs.tar.gz`` — every step's log (each cut to its last :data:`LOG_LIMIT` bytes), the junit XML, the raw JSON.
"""

from __future__ import annotations

import datetime
import glob
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

LOG_LIMIT = 2 * 2**20  # bytes kept of each log (its end: where failures and summaries are)
MESSAGE_LIMIT = 2000  # characters kept of each failing test's message in summary.json
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname_cpus": os.cpu_count(),
        # The device machine gets a copy of the working tree, maybe without .git: the caller passes the commit.
        "git_commit": os.environ.get("MIRAI_GIT_COMMIT") or _run(["git", "-C", ROOT, "rev-parse", "HEAD"]),
        "git_dirty": None,
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                            "--format=csv,noheader"]),
    }
    status = _run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    if status is not None:
        env["git_dirty"] = bool(status)
    try:
        import torch

        env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            env.update(device=torch.cuda.get_device_name(0), device_kind=f"sm_{major}{minor}",
                       device_count=torch.cuda.device_count())
        else:
            env.update(device=None, device_kind=None)
    except Exception as exc:  # the summary must still be written
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = None
        env["triton_error"] = f"{type(exc).__name__}: {exc}"
    return env


def parse_junit(path: str) -> list[dict]:
    """Every test case of a junit XML file: id (``file::name``), outcome, seconds, message (failures)."""
    tests = []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return tests
    for case in root.iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        module = classname.replace(".", "/") + ".py" if classname else ""
        entry = {"id": f"{module}::{name}" if module else name, "outcome": "passed",
                 "seconds": round(float(case.get("time", 0) or 0), 3)}
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                entry["outcome"] = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (node.get("message") or "") + "\n" + (node.text or "")
                entry["message"] = text.strip()[:MESSAGE_LIMIT]
                break
        tests.append(entry)
    return tests


_VERBOSE_LINE = re.compile(r"^(?:\[gw\d+\] \[ *\d+%\] (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (\S+::\S+)"
                           r"|(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b)")


def parse_verbose_log(path: str) -> list[dict]:
    """Test outcomes from ``pytest -v`` lines (serial or xdist), for a pytest killed before writing its XML."""
    seen: dict[str, str] = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = _VERBOSE_LINE.match(line.strip())
                if m:
                    outcome, test_id = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
                    seen[test_id] = outcome.lower()
    except OSError:
        pass
    mapping = {"passed": "passed", "failed": "failed", "skipped": "skipped", "error": "error", "xfail": "skipped",
               "xpass": "passed"}
    return [{"id": t, "outcome": mapping[o], "from": "log"} for t, o in seen.items()]


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}


def summary(work: str) -> dict:
    env = _load_json(os.path.join(work, "environment.json"))
    steps = []
    if os.path.exists(os.path.join(work, "steps.jsonl")):
        with open(os.path.join(work, "steps.jsonl")) as f:
            steps = [json.loads(line) for line in f if line.strip()]
    tests = []
    for path in sorted(glob.glob(os.path.join(work, "*.xml"))):
        tests += parse_junit(path)
    if not tests and os.path.exists(os.path.join(work, "pytest_gpu.log")):
        tests = parse_verbose_log(os.path.join(work, "pytest_gpu.log"))  # killed before its XML was written
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    benchmarks = {os.path.basename(p)[: -len(".json")]: _load_json(p)
                  for p in sorted(glob.glob(os.path.join(work, "bench_*.json")))}
    selftest = _load_json(os.path.join(work, "selftest.json")) if os.path.exists(
        os.path.join(work, "selftest.json")) else None
    return {"format": 1, "suite": "benchmarks/gpu_suite.sh", "environment": env, "steps": steps,
            "test_counts": counts, "tests": tests, "benchmarks": benchmarks, "selftest": selftest}


def _add_tail(tar: tarfile.TarFile, path: str, arcname: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size > LOG_LIMIT:
            f.seek(size - LOG_LIMIT)
        data = f.read()
    if size > LOG_LIMIT:
        data = f"[first {size - LOG_LIMIT} bytes cut]\n".encode() + data
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime = len(data), int(os.path.getmtime(path))
    tar.addfile(info, io.BytesIO(data))


def pack(work: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    # Write to temporary names, then rename: a kill during packing leaves the previous complete pair.
    tmp_json, tmp_tar = os.path.join(out, ".summary.json.tmp"), os.path.join(out, ".logs.tar.gz.tmp")
    with open(tmp_json, "w") as f:
        json.dump(summary(work), f, indent=1)
    with tarfile.open(tmp_tar, "w:gz") as tar:
        for path in sorted(glob.glob(os.path.join(work, "*"))):
            if os.path.isfile(path):
                _add_tail(tar, path, os.path.join("gpu_suite", os.path.basename(path)))
    os.replace(tmp_json, os.path.join(out, "summary.json"))
    os.replace(tmp_tar, os.path.join(out, "logs.tar.gz"))


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "environment":
        with open(os.path.join(argv[1], "environment.json"), "w") as f:
            json.dump(environment(), f, indent=1)
        return 0
    if len(argv) == 3 and argv[0] == "pack":
        pack(argv[1], argv[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
