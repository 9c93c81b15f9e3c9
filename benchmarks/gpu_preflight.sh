#!/usr/bin/env bash
# Preflight for the lent GPU machine's software stack, run on a CPU machine before a GPU run is spent on it.
#
#   bash benchmarks/gpu_preflight.sh            # all stages; a summary table at the end, exit 1 if any failed
#   bash benchmarks/gpu_preflight.sh --help
#
# The GPU machine runs Python 3.12, torch 2.11 (CUDA 13.0) and Triton 3.6, not this project's development stack
# (Python 3.11, torch 2.14.1, Triton 3.8). This script rebuilds that stack here and checks everything that can be
# checked without a GPU:
#   venv   a virtual environment with Python 3.12, torch==2.11.0, triton==3.6.0 and the test dependencies
#          ($MIRAI_GPU_VENV, default /work/venv-gpu-stack: outside the repository); reused when its versions match
#   copy   a snapshot of the working tree (tracked + untracked-not-ignored files) in $MIRAI_PREFLIGHT_DIR/src, so
#          the build's .so files and build/ never mix with the development venv's
#   build  both extensions, CUDA compile-only (MIRAI_CUDA=1, sm_90), against torch 2.11; both must import
#   aot    every shipped Triton kernel configuration compiled for sm_90 with Triton 3.6
#          (python -m mirai_kernels.triton.aot_check)
#   selftest  python -m mirai_kernels.selftest --device cpu: the C++ backends and Triton 3.6's interpreter
#   tests  the CPU test suite (Triton 3.6's interpreter, the C++ backends), every test reported
#          (venv and copy always run; --stages picks among the others)
# Each stage is timed and logged to $MIRAI_PREFLIGHT_DIR/<stage>.log (default /tmp/mirai-preflight); a failing
# stage does not stop the later ones that do not depend on it.
set -uo pipefail
# Stages to run (default all): --stages venv,copy,build,tests skips the AOT check, for instance.
STAGES=",venv,copy,build,aot,selftest,tests,"
case "${1:-}" in
  --help|-h) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --stages) STAGES=",venv,copy,${2:?--stages takes a comma-separated list},"; shift 2 ;;
  "") ;;
  *) echo "usage: $0 [--stages build,aot,selftest,tests]" >&2; exit 2 ;;
esac
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${MIRAI_GPU_VENV:-/work/venv-gpu-stack}
WORK=${MIRAI_PREFLIGHT_DIR:-/tmp/mirai-preflight}
TORCH_PIN=${MIRAI_PREFLIGHT_TORCH:-2.11.0}
TRITON_PIN=${MIRAI_PREFLIGHT_TRITON:-3.6.0}
TORCHVISION_PIN=${MIRAI_PREFLIGHT_TORCHVISION:-0.26.0}  # the torchvision built for torch 2.11 (the GPU machines')
TEST_TIMEOUT=${MIRAI_PREFLIGHT_TEST_TIMEOUT:-3000}
# What .ci/setup installs besides torch: the test and evaluation dependencies (torch-fidelity needs torchvision).
EXTRA_PKGS=(numpy tqdm pytest pytest-timeout matplotlib torch-fidelity==0.4.0 "torchvision==$TORCHVISION_PIN")
mkdir -p "$WORK"
: > "$WORK/summary.txt"
failed=0

stage() {  # stage NAME CMD...: run, time, log to $WORK/NAME.log, record pass/fail
  local name=$1; shift
  case "$STAGES" in *",$name,"*) ;; *) echo "$name  (not run)" | tee -a "$WORK/summary.txt"; return 0 ;; esac
  local t0=$SECONDS
  echo "== $name"
  "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  local verdict=pass; [ $rc -eq 0 ] || { verdict=FAIL; failed=1; }
  printf '%-6s %-5s %5ds  rc=%d  log %s\n' "$name" "$verdict" "$dt" "$rc" "$WORK/$name.log" | tee -a "$WORK/summary.txt"
  tail -n 4 "$WORK/$name.log" | sed 's/^/    /'
  return $rc
}

find_python312() {
  local c
  for c in "${PYTHON312:-}" "$(command -v python3.12 2>/dev/null)" \
           "$(pyenv prefix 3.12 2>/dev/null)/bin/python3.12" /root/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

make_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_PIN" "$TRITON_PIN" <<'PY'
import sys, torch, triton, pytest, numpy, torch_fidelity, torchvision, matplotlib  # noqa: F401
assert sys.version_info[:2] == (3, 12), sys.version
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert triton.__version__ == sys.argv[2], triton.__version__
PY
  then
    echo "reusing $VENV"
  else
    if [ ! -x "$VENV/bin/python" ]; then
      local py; py=$(find_python312) || { echo "no Python 3.12 found (set PYTHON312, or pyenv install 3.12)"; return 1; }
      echo "creating $VENV with $py"
      "$py" -m venv "$VENV" || return 1
    fi
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "setuptools>=70" ninja \
      "torch==$TORCH_PIN" "triton==$TRITON_PIN" "${EXTRA_PKGS[@]}" || return 1
  fi
  "$VENV/bin/python" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| triton', triton.__version__)"
}

copy_tree() {
  mkdir -p "$WORK/src" || return 1
  # Tracked and untracked-not-ignored files: what the device tool would send; no .so, no build/. Extracted over
  # the last copy with the files' own mtimes, so an unchanged source is not recompiled; files gone from the tree
  # are removed from the copy.
  (cd "$REPO" && git ls-files --cached --others --exclude-standard | while IFS= read -r f; do [ -e "$f" ] && echo "$f"; done) \
    | LC_ALL=C sort > "$WORK/files.txt" || return 1
  (cd "$REPO" && tar -T "$WORK/files.txt" -cf -) | tar -C "$WORK/src" -xf - || return 1
  (cd "$WORK/src" && find . -type f ! -path './build/*' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -name '*.so' \
     | sed 's|^\./||' | LC_ALL=C sort | LC_ALL=C comm -23 - "$WORK/files.txt" | while IFS= read -r f; do rm -f "$f"; done)
  echo "copied $(wc -l < "$WORK/files.txt") files from $REPO (HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null))"
}

build() {
  cd "$WORK/src" || return 1
  MIRAI_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . || return 1
  "$VENV/bin/python" - <<'PY'
import torch, mirai_kernels.backend as B
assert B.cpp_available(), B._extension_error("mirai_kernels._C")
assert B.cuda_ext_available(), B._extension_error("mirai_kernels._C_cuda")
ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mirai::"))
print("torch.ops.mirai:", ", ".join(ops))
PY
}

aot() {
  cd "$WORK/src" && env -u TRITON_INTERPRET "$VENV/bin/python" -m mirai_kernels.triton.aot_check --json "$WORK/aot.json"
}

selftest() {
  # Every fast backend that runs on CPU against the reference, Triton's under the 3.6 interpreter; records nothing.
  cd "$WORK/src" && TRITON_INTERPRET=1 timeout 900 "$VENV/bin/python" -m mirai_kernels.selftest --device cpu --no-record
}

tests() {
  cd "$WORK/src" && timeout "$TEST_TIMEOUT" "$VENV/bin/python" -m pytest tests -q -rfE -p no:cacheprovider \
    --junitxml="$WORK/tests.xml"
}

t_start=$SECONDS
if stage venv make_venv; then
  stage copy copy_tree && stage build build
  built=$?
  if [ -d "$WORK/src" ]; then
    stage aot aot
    # The tests need the C++ extension; without it they would only show the build failure again.
    if [ $built -eq 0 ]; then stage selftest selftest; stage tests tests; else echo "tests skipped: build failed" | tee -a "$WORK/summary.txt"; failed=1; fi
  fi
fi
echo
echo "preflight (torch $TORCH_PIN, triton $TRITON_PIN) in $((SECONDS - t_start)) s:"
cat "$WORK/summary.txt"
exit $failed
