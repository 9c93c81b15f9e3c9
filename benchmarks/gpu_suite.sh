#!/usr/bin/env bash
# The prepared run for a lent GPU machine: one command, at most 8 minutes, at most 2 result files.
#
#   device run:  MIRAI_GIT_COMMIT=<sha> bash benchmarks/gpu_suite.sh      ($OUT set by the device tool)
#   here:        bash benchmarks/gpu_suite.sh --dry-run                   (steps, budgets, commands; runs nothing)
#                bash benchmarks/gpu_suite.sh --fake                      (every step replaced by a quick stand-in:
#                                                                          the output layout, tested on CPU)
# Steps run in order, each under its own `timeout` budget (they sum below MIRAI_SUITE_LIMIT, 480 s by default,
# which leaves margin inside the device tool's 10-minute command for the machine's start and the transfers):
# correctness first (build the CUDA extension there, never a carried .so; `pytest -m gpu`, every test reported,
# no -x), then the mirai_kernels selftest, then the headline benchmarks at the README's GPU shapes. A failing or
# timed-out step is recorded, never fatal. After every step the scratch directory is packed into $OUT:
#   summary.json   environment (device, torch, CUDA, triton, git commit, date), steps, every test's outcome,
#                  every benchmark's JSON, the selftest's table
#   logs.tar.gz    every step's log (tail-capped), the junit XML, the raw JSON
# so a kill mid-run still leaves everything finished before it. Commit $OUT under benchmarks/results/gpu-<date>/
# and run `python benchmarks/record_gpu_results.py` to fill GPU_VALIDATED from it.
# Environment: OUT (default benchmarks/results/gpu-<utc date>), PY (default python3: the device machine has no
# `python`), MIRAI_SUITE_LIMIT (s), MIRAI_SUITE_BUDGET_<step> (s, per step), MIRAI_SUITE_SCRATCH, MAX_JOBS (16),
# MIRAI_GIT_COMMIT (the device machine's copy of the tree may have no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fake) MODE=fake ;;
  -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run|--fake|--help]" >&2; exit 2 ;;
esac
PY=${PY:-python3}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # steps may change directory
LIMIT=${MIRAI_SUITE_LIMIT:-480}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
JOBS=${MAX_JOBS:-16}

# name|budget seconds|command (run with bash -c; $W is the scratch directory, $PY the interpreter).
# The build first deletes any extension .so in the tree: only one built here, against this machine's torch, loads.
# Budgets from what each step does: the CUDA extension is 2 .cu files for sm_90 only; pytest -m gpu is ~100 tests
# whose time is mostly Triton JIT compiles (xdist spreads them over processes when it is installed); each
# benchmark runs short do_bench windows (--warmup 10 --rep 40 ms) at the README's GPU shapes; the dual-attention
# forward autotunes over the 2 configs per head dim it ships (all AOT-checked for sm_90), nothing more. spec_e2e_bench
# is decode_bench's end-to-end part alone: GPT-B 16x16, batch 32, CFG 2, the CUDA-graph plain sampler beside
# speculative Jacobi decoding at window 16 (no eager baseline, short do_bench windows: each call is a whole batch).
STEPS=(
  "build|85|find mirai_kernels -maxdepth 1 -name '_C*.so' -delete && MIRAI_CUDA=1 MAX_JOBS=$JOBS TORCH_CUDA_ARCH_LIST=9.0 \$PY -m pip install --no-build-isolation --no-deps -v -e ."
  "pytest_gpu|120|\$PY -m pytest -m gpu tests -v -rA -p no:cacheprovider --timeout 90 \$SESSION_TIMEOUT --junitxml=\$W/pytest_gpu.xml \$XDIST"
  "selftest|20|\$PY -m mirai_kernels.selftest --json \$W/selftest.json --cache \$W/selftest_cache.json"
  "attn_bench|50|\$PY benchmarks/attn_bench.py --batch 32 --heads 16 --seqlens 256 576 --no-flex --warmup 10 --rep 40 --json \$W/bench_attn.json"
  "foresight_bench|17|\$PY benchmarks/foresight_bench.py --gpt-b --warmup 10 --rep 40 --json \$W/bench_foresight.json"
  "decode_bench|32|\$PY benchmarks/decode_bench.py --rope --e2e-batch 32 --warmup 10 --rep 40 --json \$W/bench_decode.json"
  "spec_e2e_bench|23|\$PY benchmarks/decode_bench.py --no-kernels --no-e2e-eager --e2e-batch 32 --e2e-windows 16 --warmup 5 --rep 20 --json \$W/bench_spec_e2e.json"
  "rope_bench|15|\$PY benchmarks/rope_bench.py --warmup 10 --rep 40 --json \$W/bench_rope.json"
  "train_bench|30|\$PY benchmarks/train_bench.py --warmup 10 --rep 40 --json \$W/bench_train.json"
)
ENV_BUDGET=20   # the environment record (imports torch and triton, runs nvidia-smi)
PACK_BUDGET=5   # each pack (one before the steps, one after each)
KILL_AFTER=2    # a step still alive this long after its budget's SIGTERM gets SIGKILL: counted in the total

budget_of() {  # budget_of NAME DEFAULT: MIRAI_SUITE_BUDGET_<NAME> overrides
  local var="MIRAI_SUITE_BUDGET_$1"
  echo "${!var:-$2}"
}

total=$((ENV_BUDGET + (${#STEPS[@]} + 1) * PACK_BUDGET + ${#STEPS[@]} * KILL_AFTER))
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name budget cmd <<< "$entry"
  total=$((total + $(budget_of "$name" "$budget")))
done

if [ "$MODE" = dry ]; then
  echo "gpu_suite: ${#STEPS[@]} steps, budgets sum to ${total} s of a ${LIMIT} s limit; results -> $OUT/{summary.json,logs.tar.gz}"
  printf '  %-16s %5s  %s\n' step budget command
  printf '  %-16s %4ss  %s\n' environment "$ENV_BUDGET" "\$PY benchmarks/gpu_suite_pack.py environment \$W"
  printf '  %-16s %4ss  %s\n' pack "$(( (${#STEPS[@]} + 1) * PACK_BUDGET ))" "\$PY benchmarks/gpu_suite_pack.py pack \$W \$OUT, before the steps and after each (${PACK_BUDGET} s each)"
  printf '  %-16s %4ss  %s\n' kill-after "$(( ${#STEPS[@]} * KILL_AFTER ))" "timeout --kill-after=${KILL_AFTER}: SIGKILL for a step that outlives its SIGTERM"
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name budget cmd <<< "$entry"
    printf '  %-16s %4ss  %s\n' "$name" "$(budget_of "$name" "$budget")" "$cmd"
  done
  [ "$total" -le "$LIMIT" ] || { echo "budgets exceed the limit" >&2; exit 1; }
  exit 0
fi
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu_suite: step budgets sum to $total s > limit $LIMIT s; lower MIRAI_SUITE_BUDGET_<step>" >&2
  exit 2
fi

if [ "$MODE" = run ] && ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_suite: no NVIDIA GPU here (nvidia-smi -L failed); --dry-run lists the steps, --fake tests the layout" >&2
  exit 2
fi
W=${MIRAI_SUITE_SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/mirai-gpu-suite.XXXXXX")}
mkdir -p "$W" "$OUT"
export W PY
XDIST=""
if [ "$MODE" = run ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
# pytest-timeout >= 2.3 ends the session cleanly before the step's budget, so the junit XML is still written (the
# -v log lines are the fallback record if it is killed anyway).
SESSION_TIMEOUT=""
if [ "$MODE" = run ] && "$PY" -c "import importlib.metadata as m, sys; sys.exit(tuple(map(int, m.version('pytest-timeout').split('.')[:2])) < (2, 3))" 2>/dev/null; then
  SESSION_TIMEOUT="--session-timeout $(( $(budget_of pytest_gpu 120) - 15 ))"
fi
export XDIST SESSION_TIMEOUT
# Stand-ins for --fake: quick commands that leave the same kinds of files the real steps leave.
fake_cmd() {
  case "$1" in
    pytest_gpu) echo "cd \$W && printf 'import pytest\ndef test_ok():\n    pass\ndef test_bad():\n    assert 0, \"planted\"\n@pytest.mark.skip(reason=\"planted\")\ndef test_skip():\n    pass\n' > fake_test_gpu.py && \$PY -m pytest -q -p no:cacheprovider -rA --junitxml=\$W/pytest_gpu.xml fake_test_gpu.py; rc=\$?; rm -f fake_test_gpu.py; exit \$rc" ;;
    selftest) echo "echo '{\"fake\": true, \"faces\": {}}' > \$W/selftest.json" ;;
    *_bench) local short=${1%_bench}; echo "echo '{\"benchmark\": \"$short\", \"fake\": true, \"results\": []}' > \$W/bench_$short.json; echo fake $1" ;;
    *) echo "echo fake $1" ;;
  esac
}

t0=$SECONDS
echo "gpu_suite ($MODE): scratch $W, results $OUT, limit $LIMIT s"
timeout "$ENV_BUDGET" "$PY" benchmarks/gpu_suite_pack.py environment "$W" ||
  printf '{"date": "%s", "git_commit": "%s", "error": "the environment step failed or timed out"}\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" "${MIRAI_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" > "$W/environment.json"
: > "$W/steps.jsonl"
timeout "$PACK_BUDGET" "$PY" benchmarks/gpu_suite_pack.py pack "$W" "$OUT"
status=0
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name budget cmd <<< "$entry"
  budget=$(budget_of "$name" "$budget")
  [ "$MODE" = fake ] && cmd=$(fake_cmd "$name")
  hang_var="MIRAI_SUITE_FAKE_HANG_$name"
  [ "$MODE" = fake ] && [ -n "${!hang_var:-}" ] && cmd="sleep ${!hang_var}"
  echo "== $name (budget ${budget}s): $cmd"
  s0=$SECONDS
  # --kill-after: a step that ignores SIGTERM cannot take the next step's time.
  timeout --kill-after="$KILL_AFTER" "$budget" bash -c "$cmd" > "$W/$name.log" 2>&1
  rc=$?
  dt=$((SECONDS - s0))
  timed_out=false; { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && timed_out=true
  [ $rc -eq 0 ] || status=1
  printf '{"name": "%s", "budget_s": %d, "rc": %d, "seconds": %d, "timed_out": %s}\n' \
    "$name" "$budget" "$rc" "$dt" "$timed_out" >> "$W/steps.jsonl"
  echo "   rc=$rc in ${dt}s$([ "$timed_out" = true ] && echo ' (TIMED OUT)')"
  tail -n 3 "$W/$name.log" | sed 's/^/   | /'
  timeout "$PACK_BUDGET" "$PY" benchmarks/gpu_suite_pack.py pack "$W" "$OUT" || echo "   (pack failed)"
done
echo "gpu_suite done in $((SECONDS - t0)) s; results in $OUT:"
ls -l "$OUT"
[ -n "${MIRAI_SUITE_SCRATCH:-}" ] || rm -rf "$W"
exit $status
