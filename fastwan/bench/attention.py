"""``fastwan bench attention``: dense SDPA vs VSA, forward and forward+backward.

Every case times PyTorch's ``scaled_dot_product_attention`` and ``video_sparse_attention``
on the same tensors in the same run and reports dense/VSA time ratios. FLOP counts follow
the flash-attention convention: forward 4 * B * H * S * S_kv * D, backward 2.5x forward.
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastwan.attention import num_selected_tiles, resolve_backend, video_sparse_attention
from fastwan.attention.tiling import tile_counts_per_dim
from fastwan.bench.timing import measure

# Token grids (T, H/2, W/2) of Wan latents; 21 x 30 x 52 is Wan2.1's 480P, 81-frame grid.
GRIDS = {8192: (8, 32, 32), 16384: (16, 32, 32), 32760: (21, 30, 52)}
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
# Speed goals (issue #2): (device type, mode, sparsity, min S) -> min dense/VSA ratio.
GOALS = {
    ("cpu", "fwd+bwd", 0.9, 16384): 5.0,
    ("cpu", "fwd+bwd", 0.8, 16384): 3.0,
    ("cuda", "fwd+bwd", 0.9, 32760): 5.0,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=sorted(GRIDS),
        help=f"sequence lengths, from {sorted(GRIDS)}",
    )
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument(
        "--heads", type=int, default=None, help="attention heads (default: 1 on CPU, 12 on CUDA)"
    )
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--backend", default="auto", help="VSA backend (auto, torch, triton)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case")
    parser.add_argument(
        "--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one short case per mode (S=8192, sparsity 0.9): a smoke run",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _attention_flops(B, H, S, S_kv, D, mode):
    fwd = 4.0 * B * H * S * S_kv * D
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def _step(fn, q, k, v, mode):
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        return fwd
    do = torch.randn_like(q)

    def run():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    return run


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    heads = args.heads or (12 if device.type == "cuda" else 1)
    repeats = args.repeats or (10 if device.type == "cuda" else 1)
    seq_lens, sparsities = ([8192], [0.9]) if args.quick else (args.seq_lens, args.sparsities)
    for s in seq_lens:
        if s not in GRIDS:
            raise ValueError(f"--seq-lens: {s} is not one of {sorted(GRIDS)}")
    for sp in sparsities:
        if not 0.0 <= sp < 1.0:
            raise ValueError(f"--sparsities: {sp} must be in [0, 1)")
    backend = resolve_backend(args.backend, device)
    D, B = args.head_dim, 1
    gen = torch.Generator(device="cpu").manual_seed(0)

    results = []
    cases = [(s, m) for s in seq_lens for m in args.modes]
    bar = tqdm(total=len(cases) * (1 + len(sparsities)), desc="bench attention", unit="case")
    for S, mode in cases:
        grid = GRIDS[S]
        q, k, v = (
            torch.randn(B, heads, S, D, generator=gen).to(device, dtype).requires_grad_()
            for _ in range(3)
        )
        dense = measure(_step(F.scaled_dot_product_attention, q, k, v, mode), device, repeats)
        bar.update()
        n_tiles = math.prod(tile_counts_per_dim(grid, (4, 4, 4)))
        for sp in sparsities:
            fn = lambda q, k, v, sp=sp, grid=grid: video_sparse_attention(  # noqa: E731
                q, k, v, grid=grid, sparsity=sp, backend=backend
            )
            t = measure(_step(fn, q, k, v, mode), device, repeats)
            kv = num_selected_tiles(n_tiles, sp) * 64
            dense_flops = _attention_flops(B, heads, S, S, D, mode)
            results.append(
                {
                    "seq_len": S,
                    "grid": list(grid),
                    "mode": mode,
                    "sparsity": sp,
                    "selected_tiles": kv // 64,
                    "num_tiles": n_tiles,
                    "dense_s": dense["median_s"],
                    "vsa_s": t["median_s"],
                    "speedup": dense["median_s"] / t["median_s"],
                    "dense_tflops": dense_flops / dense["median_s"] / 1e12,
                    "vsa_dense_equiv_tflops": dense_flops / t["median_s"] / 1e12,
                    "vsa_sparse_tflops": _attention_flops(B, heads, S, kv, D, mode)
                    / t["median_s"]
                    / 1e12,
                }
            )
            bar.update()
        del q, k, v
    bar.close()

    goals = []
    for (dev, mode, sp, min_s), target in GOALS.items():
        rows = [
            r
            for r in results
            if dev == device.type
            and r["mode"] == mode
            and r["sparsity"] == sp
            and r["seq_len"] >= min_s
        ]
        for r in rows:
            goals.append(
                {
                    "goal": f"{mode} sparsity {sp} S={r['seq_len']} >= {target}x",
                    "speedup": r["speedup"],
                    "met": r["speedup"] >= target,
                }
            )
    report = {
        "benchmark": "attention",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "heads": heads,
        "head_dim": D,
        "batch": B,
        "repeats": repeats,
        "torch": torch.__version__,
        "results": results,
        "goals": goals,
    }
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


def _print(report: dict) -> None:
    print(
        f"\nVSA vs dense SDPA on {report['device']}, {report['dtype']}, backend "
        f"{report['backend']}, B={report['batch']} H={report['heads']} D={report['head_dim']}"
    )
    head = (
        f"{'S':>6} {'mode':>8} {'sparsity':>8} {'tiles':>9} {'dense s':>9} {'VSA s':>9} "
        f"{'dense/VSA':>9} {'TFLOP/s dense-eq':>17} {'sparse':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        print(
            f"{r['seq_len']:>6} {r['mode']:>8} {r['sparsity']:>8.2f} "
            f"{r['selected_tiles']:>4}/{r['num_tiles']:<4} {r['dense_s']:>9.4f} "
            f"{r['vsa_s']:>9.4f} {r['speedup']:>8.2f}x {r['vsa_dense_equiv_tflops']:>17.3f} "
            f"{r['vsa_sparse_tflops']:>8.3f}"
        )
    for g in report["goals"]:
        print(f"goal {g['goal']}: {g['speedup']:.2f}x {'MET' if g['met'] else 'NOT MET'}")
