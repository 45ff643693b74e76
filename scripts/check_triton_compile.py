"""Compile fastwan's Triton kernels ahead of time for NVIDIA GPUs, without a GPU.

Triton lowers each kernel to PTX and assembles it with the ``ptxas`` its wheel ships, so a
CPU machine can check that every kernel still compiles for the GPUs users run (shared
memory and register limits included) after a change, or against another Triton version:

    python scripts/check_triton_compile.py                      # sm_80, sm_89, sm_90
    python scripts/check_triton_compile.py --arch 90 --dtype bf16 fp32
    PYTHONPATH=/path/to/triton-3.6 python scripts/check_triton_compile.py

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels). Exit status 1
if any kernel fails to compile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Kernel arguments by name: pointers get the operand dtype ("OP") or a fixed type.
_SIGNATURES = {
    "_fwd_kernel": "Q K V O:OP LSE:*fp32 IDX:*i32 COUNTS:*i32 N KSEL D:i32 qk_scale:fp32",
    "_dq_kernel": (
        "Q K V DO:OP LSE:*fp32 DQ:OP LSE2 DELTA:*fp32 IDX COUNTS:*i32 N KSEL D:i32 "
        "qk_scale scale:fp32"
    ),
    "_dkdv_kernel": (
        "Q K V DO:OP LSE2 DELTA:*fp32 DK DV:OP REV_OFFSETS:*i64 REV_QTILES COUNTS:*i32 "
        "N D:i32 qk_scale scale:fp32"
    ),
    "_tile_mean_kernel": "X:OP OUT:*fp32 COUNTS:*i32 N D:i32",
}
_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(spec: str, operand: str) -> dict[str, str]:
    """``"A B:t C:u"`` -> {A: t, B: t, C: u} (names take the type that follows them)."""
    sig, pending = {}, []
    for item in spec.split():
        name, _, kind = item.partition(":")
        pending.append(name)
        if kind:
            for n in pending:
                sig[n] = operand if kind == "OP" else kind
            pending = []
    return sig


def check(archs: list[int], dtypes: list[str], slots: int, head_dim: int) -> list[str]:
    """Compile every kernel for every (arch, dtype); returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastwan.attention import triton_backend as tb

    block_d = tb._block_d(head_dim)
    failures = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dtype in dtypes:
            precision = tb._precision({"fp32": tb.torch.float32}.get(dtype, tb.torch.bfloat16))
            for name, spec in _SIGNATURES.items():
                const = {"SLOTS": slots, "BLOCK_D": block_d}
                if name != "_tile_mean_kernel":
                    const["PRECISION"] = precision
                accumulators = 2 if name == "_dkdv_kernel" else 1
                warps = 4 if name == "_tile_mean_kernel" else tb._num_warps(block_d, accumulators)
                options = {"num_warps": warps, "num_stages": 2}  # as the launchers use
                sig = {**_signature(spec, _DTYPES[dtype]), **dict.fromkeys(const, "constexpr")}
                t0 = time.perf_counter()
                try:
                    src = ASTSource(fn=getattr(tb, name), signature=sig, constexprs=const)
                    kernel = triton.compile(src, target=target, options=options)
                    status = f"ok ({len(kernel.asm['cubin'])} B cubin)"
                except Exception as e:  # report every failure, not just the first
                    status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    failures.append(f"sm_{arch} {dtype} {name}: {status}")
                dt = time.perf_counter() - t0
                print(f"sm_{arch} {dtype:<5} {name:<18} {status} in {dt:.1f} s", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 89, 90], help="SM versions")
    p.add_argument("--dtype", nargs="+", choices=sorted(_DTYPES), default=["bf16", "fp16"])
    p.add_argument("--slots", type=int, default=64, help="tile slots (a power of two >= 16)")
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__}")
    failures = check(args.arch, args.dtype, args.slots, args.head_dim)
    for f in failures:
        print(f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
