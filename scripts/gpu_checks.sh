#!/usr/bin/env bash
# Every GPU check of the project in one go, for a CUDA machine (an H100 / H200 lent to a
# session, or yours): the GPU-only tests, the Triton VSA kernel benchmark and the Wan2.1
# 1.3B denoise benchmark (eager and torch.compile'd). Run from the repository root:
#
#   bash scripts/gpu_checks.sh OUTDIR [tests] [attention] [denoise] [compiled]
#
# (no stage names: all four). Writes OUTDIR/log.txt and one JSON per benchmark, the files
# BENCHMARKS.md's GPU section is made from. Pure-Python wheels the machine lacks (e.g.
# diffusers) can wait in .whl/ (git-ignored): they are installed to /tmp/site first.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_checks.sh OUTDIR [tests] [attention] [denoise] [compiled]}
shift
stages=${*:-tests attention denoise compiled}
mkdir -p "$out"
log="$out/log.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee -a "$log" || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("scripts/gpu_checks.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
import triton
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
PY
status=0
for stage in $stages; do
  echo "== $stage" | tee -a "$log"
  case $stage in
    tests) python3 -m pytest -q -m gpu tests 2>&1 | tee -a "$log" ;;
    attention) python3 benchmarks/attention.py --json "$out/attention_gpu.json" 2>&1 | tee -a "$log" ;;
    denoise) python3 benchmarks/denoise.py --device cuda --json "$out/denoise_gpu.json" 2>&1 | tee -a "$log" ;;
    compiled)
      python3 benchmarks/denoise.py --device cuda --compile \
        --json "$out/denoise_gpu_compiled.json" 2>&1 | tee -a "$log" ;;
    *) echo "unknown stage $stage (tests, attention, denoise, compiled)" | tee -a "$log"; false ;;
  esac
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $stage failed (exit $rc)" | tee -a "$log"; status=1; }
done
exit $status
