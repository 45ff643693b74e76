#!/usr/bin/env bash
# Every GPU check of the project in one go, for a CUDA machine (an H100 / H200 lent to a
# session, or yours): the GPU-only tests, the Triton VSA kernel benchmark and the Wan2.1
# 1.3B denoise benchmark (eager and torch.compile'd), and FastVideo's own VSA beside
# fastwan's (peer). Run from the repository root:
#
#   bash scripts/gpu_checks.sh OUTDIR [tests] [attention] [denoise] [compiled] [peer]
#
# (no stage names: all five). Writes OUTDIR/log.txt and one JSON per benchmark, the files
# BENCHMARKS.md's GPU section is made from. Pure-Python wheels the machine lacks (e.g.
# diffusers) can wait in .whl/ (git-ignored): they are installed to /tmp/site first.
#
# The peer stage needs FastVideo's source distribution (fastvideo-kernel 0.3.5) in .peer/
# or at FASTWAN_PEER_SRC: `FASTWAN_PEER_NO_TRITON=1 bash scripts/fetch_peer.sh` fills .peer/
# (no Triton: the 700 MB one it fetches is for CPU interpreter runs; a GPU's own Triton
# 3.6-3.8 compiles the peer's kernels). .peer/ is git-ignored and a lent machine cannot
# reach PyPI, so a run there names its two parts in carry (about 24 MB of the 64 MiB):
#   .peer/fastvideo_kernel-0.3.5/python
#   .peer/fastvideo_kernel-0.3.5/dist/fastvideo_kernel-0.3.5-cp312-cp312-manylinux_2_34_x86_64.manylinux_2_35_x86_64.whl
# and runs `bash scripts/gpu_checks.sh $OUT peer` as its one command (timeout_s 600): the
# benchmark stops itself after FASTWAN_PEER_TIMEOUT seconds (default 480), and its JSON,
# rewritten after every grid x sparsity case, keeps the cases done ("complete": false).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_checks.sh OUTDIR [tests] [attention] [denoise] [compiled] [peer]}
shift
stages=${*:-tests attention denoise compiled peer}
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
# FastVideo's VSA (fastvideo-kernel) beside fastwan's, in one stage that fits one 10-minute
# command. Its compiled sm_90 kernels: from the cp3XX wheel its sdist ships in dist/ (built
# for torch 2.12) when its extension loads with this torch; else from a build of the sdist
# (pip --no-build-isolation) when the sdist holds ThunderKittens' headers, which 0.3.5's
# does not (FASTWAN_PEER_BUILD=1 tries anyway); else its Triton kernels alone, the package
# itself or, without a wheel for this Python, the source tree.
peer_stage() {
  local src=${FASTWAN_PEER_SRC:-$(ls -d .peer/fastvideo_kernel-* 2>/dev/null | head -1)}
  if [ -z "$src" ] || [ ! -d "$src/python/fastvideo_kernel" ]; then
    echo "peer: no fastvideo-kernel source; run bash scripts/fetch_peer.sh (it fills .peer/)"
    return 1
  fi
  local site=/tmp/peer_site compiled=0 tag whl
  local probe='from fastvideo_kernel._C import fastvideo_kernel_ops as o; assert o.block_sparse_fwd'
  local args=(--peer-src "$src")
  tag=$(python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  whl=$(ls "$src"/dist/*-"$tag"-*"$(uname -m)"*.whl 2>/dev/null | head -1)
  rm -rf "$site" /tmp/peer_build
  if [ -n "$whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile \
      --target "$site" "$whl"; then
    args=()  # the package on PYTHONPATH: its public video_sparse_attn
    if PYTHONPATH="$site:${PYTHONPATH:-}" timeout 120 python3 -c "$probe"; then
      compiled=1
      echo "peer: compiled kernels from $(basename "$whl")"
    else
      # a crash or a missing symbol (another torch's ABI): keep its Python, drop the .so
      echo "peer: $(basename "$whl")'s extension does not load here (built for torch 2.12)"
      rm -rf "$site/fastvideo_kernel/_C"
    fi
  else
    echo "peer: no prebuilt wheel for $tag $(uname -m) in $src/dist"
  fi
  if [ $compiled = 0 ]; then
    if [ -f "$src/include/tk/include/kittens.cuh" ] || [ "${FASTWAN_PEER_BUILD:-0}" = 1 ]; then
      echo "peer: building the sdist's CUDA kernels (sm_90a, at most 5 minutes)"
      if TORCH_CUDA_ARCH_LIST=9.0a FASTVIDEO_KERNEL_BUILD_TK=ON timeout 300 \
          python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/peer_build \
          "$src" && PYTHONPATH="/tmp/peer_build:${PYTHONPATH:-}" timeout 120 \
          python3 -c "$probe"; then
        site=/tmp/peer_build args=() compiled=1
      else
        echo "peer: the build failed or lacks the VSA kernel"
      fi
    else
      echo "peer: the sdist has no ThunderKittens headers (include/tk): its CUDA VSA kernel" \
        "cannot be built from it"
    fi
  fi
  [ $compiled = 1 ] || echo "peer: timing its Triton kernels only"
  PYTHONPATH="$site:${PYTHONPATH:-}" timeout "${FASTWAN_PEER_TIMEOUT:-480}" \
    python3 benchmarks/attention.py --peer fastvideo "${args[@]}" \
    --json "$out/attention_peer_gpu.json"
  local rc=$?
  [ $rc = 124 ] && echo "peer: stopped after ${FASTWAN_PEER_TIMEOUT:-480} s; the JSON holds the cases done"
  return $rc
}

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
    peer) peer_stage 2>&1 | tee -a "$log" ;;
    *) echo "unknown stage $stage (tests, attention, denoise, compiled, peer)" | tee -a "$log"; false ;;
  esac
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $stage failed (exit $rc)" | tee -a "$log"; status=1; }
done
exit $status
