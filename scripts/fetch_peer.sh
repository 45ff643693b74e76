#!/usr/bin/env bash
# Fetches FastVideo's VSA kernels, the peer of `fastwan bench attention --peer fastvideo`,
# with pip into DIR (default .peer/, git-ignored): never into fastwan itself.
#
#   bash scripts/fetch_peer.sh [DIR]     # prints the unpacked source folder (absolute)
#
# DIR/fastvideo_kernel-0.3.5/  the source distribution from PyPI, unpacked: its Triton
#                              kernels (python/fastvideo_kernel/), and prebuilt cp312 wheels
#                              with its compiled sm_90 kernels (dist/, for torch 2.12)
# DIR/triton-3.7.0/            Triton 3.7.0 (PYTHONPATH) for CPU runs under the Triton
#                              interpreter: the peer's forward kernel uses tl.make_block_ptr,
#                              which Triton 3.9 removed, and 3.6's interpreter fails on
#                              NumPy 2. About 700 MB; skip it with FASTWAN_PEER_NO_TRITON=1
#                              (a GPU machine with Triton <= 3.8 needs none).
# Parts already fetched are kept (a cache): a second run fetches nothing.
set -euo pipefail
dir=${1:-.peer}
version=0.3.5
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)  # absolute: pip runs the build backend in its own temp folder
src="$dir/fastvideo_kernel-$version"
if [ ! -f "$src/python/fastvideo_kernel/triton_kernels/block_sparse_attn_triton.py" ]; then
  tmp="$dir/.fetch"
  rm -rf "$tmp" "$src"
  # pip prepares an sdist's metadata even to download it. Its build backend
  # (scikit-build-core) would run CMake for that, and build isolation would first install
  # the package's torch==2.12.0 pin: use a local scikit-build-core, CMake off.
  python -m pip install -q --target "$tmp/build-tools" "scikit-build-core>=0.10" >&2
  SKBUILD_WHEEL_CMAKE=false PYTHONPATH="$tmp/build-tools" python -m pip download -q \
    --no-deps --no-binary :all: --no-build-isolation "fastvideo-kernel==$version" -d "$tmp" >&2
  tar -xzf "$tmp/fastvideo_kernel-$version.tar.gz" -C "$tmp"
  mv "$tmp/fastvideo_kernel-$version" "$src"  # only a whole unpacked tree gets its name
  rm -rf "$tmp"
fi
triton_dir="$dir/triton-3.7.0"
if [ "${FASTWAN_PEER_NO_TRITON:-0}" != 1 ] && [ ! -d "$triton_dir/triton-3.7.0.dist-info" ]; then
  rm -rf "$triton_dir"
  python -m pip install -q --no-deps --target "$triton_dir" triton==3.7.0 >&2
fi
echo "$src"
