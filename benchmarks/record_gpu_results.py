"""Fill ``GPU_VALIDATED`` / ``GPU_VALIDATED_ON`` in ``mirai_kernels/backend.py`` from the committed GPU suite results.

    python benchmarks/record_gpu_results.py            # rewrite the block between the BEGIN/END markers
    python benchmarks/record_gpu_results.py --check    # exit 1 if the block is not what the results say (CI)

Reads every ``benchmarks/results/*/summary.json`` written by ``benchmarks/gpu_suite.sh``. Each ``pytest -m gpu``
test is attributed to (op, backend): the op from its file (:data:`FILE_OPS`), the backend from its parameters
(``...[...-triton]``), else from its name (``test_triton_...``), else every GPU backend of the op. On the run's device
kind (``environment.device_kind``, e.g. ``sm_90``) an op/backend is validated when at least one of its tests passed and
none failed or errored; skipped tests count for neither. A run whose pytest step timed out, or whose outcomes were
read from the log of a killed pytest, validates nothing (some tests never ran). The newest run per device kind
decides (a later failing run revokes an earlier pass); ``GPU_VALIDATED`` names the newest result file that
validates the op/backend, ``GPU_VALIDATED_ON`` every device kind whose newest run does.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = os.path.join(ROOT, "mirai_kernels", "backend.py")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEGIN = "# BEGIN GPU_VALIDATED"
END = "# END GPU_VALIDATED"

# Which ops each GPU test file tests; and the GPU backends each op has (mirai_kernels/ops/*.py register them).
FILE_OPS = {
    "tests/test_rope.py": ("apply_rope_2d",),
    "tests/test_decode.py": ("decode_attention",),
    "tests/test_dual_attention.py": ("dual_attention",),
    "tests/test_foresight.py": ("foresight_cosine_loss", "fused_linear_cosine_loss"),
}
OP_GPU_FACES = {
    "apply_rope_2d": ("triton", "cuda"),
    "decode_attention": ("triton", "cuda"),
    "dual_attention": ("triton",),
    "foresight_cosine_loss": ("triton",),
    "fused_linear_cosine_loss": ("triton",),
}
GPU_FACES = ("triton", "cuda")


def attribute(test_id: str) -> list[tuple[str, str]]:
    """The (op, backend) pairs one test's outcome speaks for; [] for tests of no single op (models, ...)."""
    path, _, name = test_id.partition("::")
    ops = FILE_OPS.get(path)
    if not ops:
        return []
    base, _, params = name.partition("[")
    param_faces = [t for t in re.split(r"[-\]]", params) if t in GPU_FACES]
    # Only "triton" is read from a name: "cuda" in a name means CUDA graphs or devices, not the backend.
    name_faces = [t for t in base.split("_") if t == "triton"]
    pairs = []
    for op in ops:
        faces = param_faces or name_faces or list(OP_GPU_FACES[op])
        pairs += [(op, f) for f in faces if f in OP_GPU_FACES[op]]
    return pairs


def verdicts_of(summary: dict) -> dict[tuple[str, str], bool] | None:
    """(op, backend) -> validated, for one suite run; None when the run can validate nothing."""
    steps = {s.get("name"): s for s in summary.get("steps", [])}
    pytest_step = steps.get("pytest_gpu")
    if not pytest_step or pytest_step.get("timed_out") or pytest_step.get("rc") not in (0, 1):
        return None
    tests = summary.get("tests", [])
    if not tests or any(t.get("from") == "log" for t in tests):
        return None
    passed, failed = set(), set()
    for t in tests:
        for pair in attribute(t["id"]):
            if t["outcome"] == "passed":
                passed.add(pair)
            elif t["outcome"] in ("failed", "error"):
                failed.add(pair)
    return {pair: pair not in failed for pair in passed | failed}


def collect(results_dir: str = RESULTS, root: str = ROOT):
    """(GPU_VALIDATED, GPU_VALIDATED_ON) from every summary.json under ``results_dir``."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "summary.json"))):
        with open(path) as f:
            summary = json.load(f)
        if summary.get("suite") != "benchmarks/gpu_suite.sh":
            continue
        env = summary.get("environment", {})
        kind, date = env.get("device_kind"), env.get("date") or ""
        verdicts = verdicts_of(summary)
        if kind and verdicts is not None:
            runs.append((date, os.path.relpath(path, root), kind, verdicts))
    runs.sort()  # oldest first: a newer run of the same device kind overrides
    latest: dict[tuple[str, str, str], tuple[bool, str]] = {}
    for date, rel, kind, verdicts in runs:
        for (op, face), ok in verdicts.items():
            latest[(op, face, kind)] = (ok, rel)
    validated: dict[tuple[str, str], str] = {}
    kinds: dict[tuple[str, str], set] = {}
    for date, rel, kind, verdicts in runs:  # newest validating file last, so it wins
        for (op, face), ok in verdicts.items():
            if ok and latest[(op, face, kind)] == (True, rel):
                validated[(op, face)] = rel
                kinds.setdefault((op, face), set()).add(kind)
    return dict(sorted(validated.items())), {k: tuple(sorted(v)) for k, v in sorted(kinds.items())}


def render(validated: dict, kinds: dict) -> str:
    lines = [f"{BEGIN} (written by benchmarks/record_gpu_results.py; edit the results, not these lines)"]
    if validated:
        lines.append("GPU_VALIDATED: dict[tuple[str, str], str] = {")
        lines += [f"    {key!r}: {path!r}," for key, path in validated.items()]
        lines.append("}")
        lines.append("GPU_VALIDATED_ON: dict[tuple[str, str], tuple[str, ...]] = {")
        lines += [f"    {key!r}: {value!r}," for key, value in kinds.items()]
        lines.append("}")
    else:
        lines.append("GPU_VALIDATED: dict[tuple[str, str], str] = {}")
        lines.append("GPU_VALIDATED_ON: dict[tuple[str, str], tuple[str, ...]] = {}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"record_gpu_results: no '{BEGIN}' ... '{END}' block in backend.py")
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end) + 1 or len(text)
    return text[:line_start] + block + text[line_end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=RESULTS, help="directory of <run>/summary.json (default: committed)")
    parser.add_argument("--backend", default=BACKEND, help="the backend.py to update")
    parser.add_argument("--check", action="store_true", help="only check that the block is up to date")
    args = parser.parse_args(argv)
    validated, kinds = collect(args.results)
    with open(args.backend) as f:
        text = f.read()
    new = replace_block(text, render(validated, kinds))
    if args.check:
        if new != text:
            print("record_gpu_results: GPU_VALIDATED in backend.py does not match the committed results; run "
                  "`python benchmarks/record_gpu_results.py`", file=sys.stderr)
            return 1
        print(f"GPU_VALIDATED up to date ({len(validated)} op/backend entries)")
        return 0
    with open(args.backend, "w") as f:
        f.write(new)
    for (op, face), path in validated.items():
        print(f"validated {op}/{face} on {', '.join(kinds[(op, face)])}: {path}")
    print(f"wrote {len(validated)} entries to {args.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
