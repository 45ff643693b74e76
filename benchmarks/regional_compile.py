"""fastwan's regional compile against diffusers' ``compile_repeated_blocks`` (issue #16).

Compile: the same Wan transformer (random weights, ``--layers`` blocks of a tiny width) is
compiled three ways in one run and timed on the same input: fastwan's previous hand-written
per-block ``block.compile(dynamic=False)`` loop, diffusers' ``compile_repeated_blocks``
(``ModelMixin``, discovers ``_repeated_blocks``) and a whole-model ``torch.compile``; each
fresh (``torch._dynamo.reset()``), first call (compile + run) and steady forwards reported,
outputs checked equal to eager.

    python benchmarks/regional_compile.py --out benchmarks/results/regional_compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastwan.bench.timing import synchronize


def _build(layers: int, seed: int, device: torch.device):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)  # module initialisers draw from the global generator
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=16,
            out_channels=16,
            text_dim=64,
            freq_dim=32,
            ffn_dim=256,
            num_layers=layers,
            rope_max_seq_len=64,
        ).eval()


def _per_block_loop(model, backend: str) -> None:  # fastwan's compile_blocks until now
    for block in model.blocks:
        block.compile(backend=backend, dynamic=False)


def _diffusers_regional(model, backend: str) -> None:
    model.compile_repeated_blocks(backend=backend, dynamic=False)


def _whole_model(model, backend: str):
    return torch.compile(model, backend=backend, dynamic=False)


WAYS = {
    "eager": None,
    "fastwan_per_block_loop": _per_block_loop,
    "diffusers_compile_repeated_blocks": _diffusers_regional,
    "torch_compile_whole_model": _whole_model,
}


def run_way(name: str, args, device: torch.device) -> dict:
    """One way, in this (fresh) process: first call and steady forwards, error vs eager."""
    rng = torch.Generator("cpu").manual_seed(args.seed)
    x = torch.randn(1, 16, 3, 16, 16, generator=rng).to(device)  # [B, C, T, h, w]
    ctx = torch.randn(1, 24, 64, generator=rng).to(device)  # [B, L, text_dim]
    t = torch.full((1,), 500.0, device=device)

    def fwd(m):
        with torch.no_grad():
            return m(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    ref = fwd(_build(args.layers, args.seed, device))
    model = _build(args.layers, args.seed, device)
    way = WAYS[name]
    compiled = model if way is None else way(model, args.backend)
    if compiled is None:  # compiled in place
        compiled = model
    t0 = time.perf_counter()
    y = fwd(compiled)
    synchronize(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fwd(compiled)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "first_call_s": first,
        "steady_median_s": statistics.median(times),
        "steady_min_s": min(times),
        "max_abs_diff_vs_eager": (y.float() - ref.float()).abs().max().item(),
    }


def bench_compile(args) -> dict:
    """Each way in its own process with empty compile caches: no way reuses another's."""
    out = {}
    for name in WAYS:
        with tempfile.TemporaryDirectory() as cache:
            env = {
                **os.environ,
                "TORCHINDUCTOR_CACHE_DIR": cache,
                "TRITON_CACHE_DIR": cache,
                "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
            }
            cmd = [sys.executable, __file__, "--way", name, *_forwarded(args)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        r = out[name]
        print(
            f"{name:36s} first call {r['first_call_s']:7.2f} s  steady "
            f"{r['steady_median_s']:.4f} s (min {r['steady_min_s']:.4f})  "
            f"|diff| {r['max_abs_diff_vs_eager']:.2e}",
            file=sys.stderr,
        )
    loop, ours = out["fastwan_per_block_loop"], out["diffusers_compile_repeated_blocks"]
    out["ratio_first_call_loop_over_diffusers"] = loop["first_call_s"] / ours["first_call_s"]
    out["ratio_steady_min_loop_over_diffusers"] = loop["steady_min_s"] / ours["steady_min_s"]
    return out


def _forwarded(args) -> list[str]:
    flags = ["--layers", str(args.layers), "--repeats", str(args.repeats)]
    flags += ["--backend", args.backend, "--seed", str(args.seed)]
    return flags + (["--device", args.device] if args.device else [])


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/regional_compile.py", description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--way", choices=list(WAYS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.way is not None:  # a child process: one way, its result as one JSON line
        print(json.dumps(run_way(args.way, args, device)))
        return
    result = {
        "benchmark": "regional_compile",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "backend": args.backend,
        "compile": bench_compile(args),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
