#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see README, "GPU suite"). Builds the CUDA extension there, runs the
# GPU tests and every benchmark, and writes JSON/logs to $OUT (default: benchmarks/results/gpu-<date>).
#   device run:  bash benchmarks/gpu_suite.sh            (no internet there: it has torch, triton, pytest, numpy)
# Each step is time-boxed so one slow step cannot eat the whole budget; a failing step is recorded, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
status=0

run() {  # run NAME CMD...: time-boxed, output to $OUT/NAME.log, exit code recorded
  local name=$1; shift
  echo "== $name: $*"
  timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc" | tee -a "$OUT/steps.txt"
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

python - > "$OUT/environment.json" <<'PY'
import json, subprocess, datetime, torch, triton
print(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                  "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()},
                 indent=1))
PY
cat "$OUT/environment.json"

run build env MIRAI_CUDA=1 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e .
run pytest_gpu python -m pytest -m gpu tests -q -x --timeout 600 -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
run attn_bench python benchmarks/attn_bench.py --json "$OUT/attn_bench.json"
run foresight_bench python benchmarks/foresight_bench.py --json "$OUT/foresight_bench.json"
run decode_bench python benchmarks/decode_bench.py --rope --json "$OUT/decode_bench.json"
run rope_bench python benchmarks/rope_bench.py --json "$OUT/rope_bench.json"
run train_bench python benchmarks/train_bench.py --json "$OUT/train_bench.json"
echo "results in $OUT"; cat "$OUT/steps.txt"
exit $status
