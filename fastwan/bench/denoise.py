"""``fastwan bench denoise``: one Wan transformer forward, dense vs VSA, and the projected
denoising speedup of FastWan ("3 steps, VSA") over Wan ("50 steps, dense, CFG").

The transformer is diffusers' ``WanTransformer3DModel`` with a real preset's architecture
and random weights (optionally only its first ``--layers`` blocks: on a CPU one layer of
the 1.3B model at 81 x 480 x 832 already takes about a minute). Dense and each VSA
sparsity are timed on the same model and inputs in the same run, in interleaved rounds
(dense, VSA 0.8, VSA 0.9, dense, ...), so the ratios are measured, not assumed:

    projected speedup = (dense_steps * cfg_passes * t_dense) / (vsa_steps * t_vsa)

with median times (``projected_speedup``) and with each case's fastest run
(``projected_speedup_min``, steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from fastwan.arguments import add_compile_argument
from fastwan.bench.timing import synchronize
from fastwan.choices import ATTENTION_BACKENDS, DTYPES, parse_dtype

GOAL_SPEEDUP = 50.0  # issue #3: >= 50x at the Wan2.1 1.3B 480P shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b", help="architecture and video size")
    parser.add_argument("--height", type=int, default=None, help="default: the preset's (480)")
    parser.add_argument("--width", type=int, default=None, help="default: the preset's (832)")
    parser.add_argument("--num-frames", type=int, default=None, help="default: the preset's (81)")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer blocks to build (default: all on CUDA, 1 on CPU)",
    )
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--backend", default="auto", choices=ATTENTION_BACKENDS, help="VSA backend")
    parser.add_argument(
        "--tile-size", type=int, nargs=3, default=[4, 4, 4], metavar=("T", "H", "W")
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: fp32 on CPU, bf16 on CUDA",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed forwards (default: 5 CUDA, 1 CPU)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed forwards (default: 2 CUDA, 0 CPU)"
    )
    parser.add_argument("--dense-steps", type=int, default=50, help="baseline denoising steps")
    parser.add_argument("--vsa-steps", type=int, default=3, help="FastWan denoising steps")
    parser.add_argument(
        "--no-cfg", action="store_true", help="baseline without CFG (1 forward per step, not 2)"
    )
    parser.add_argument("--text-len", type=int, default=512, help="text tokens (cross-attention)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's); 1 is steadiest on a busy machine",
    )
    add_compile_argument(
        parser,
        "torch.compile each block (default backend: inductor; at least one warm-up round "
        "then, so the compile is not timed)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to ``dtype`` but keep the modules diffusers keeps in float32 (norms, time
    embedding, rope), as ``from_pretrained(torch_dtype=...)`` does for real checkpoints."""
    torch.nn.Module.to(model, dtype)  # the plain cast: diffusers' override warns about it
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            torch.nn.Module.to(module, torch.float32)
    return model


def run(args: argparse.Namespace) -> dict:
    from diffusers import WanTransformer3DModel

    from fastwan.attention import resolve_backend
    from fastwan.models.compile import compile_blocks
    from fastwan.models.presets import get_preset, transformer_config
    from fastwan.models.vsa import set_attention

    preset = get_preset(args.preset)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    on_cuda = device.type == "cuda"
    dtype = (
        parse_dtype(args.dtype, field="--dtype")
        if args.dtype
        else (torch.bfloat16 if on_cuda else torch.float32)
    )
    layers = _positive(
        "--layers",
        args.layers if args.layers is not None else (preset.num_layers if on_cuda else 1),
    )
    repeats = _positive(
        "--repeats", args.repeats if args.repeats is not None else (5 if on_cuda else 1)
    )
    warmup = args.warmup if args.warmup is not None else (2 if on_cuda else 0)
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if args.compile and warmup < 1:
        warmup = 1  # each case compiles on its first forward
    dense_steps = _positive("--dense-steps", args.dense_steps)
    vsa_steps = _positive("--vsa-steps", args.vsa_steps)
    text_len = _positive("--text-len", args.text_len)
    for sp in args.sparsities:
        if not 0.0 <= sp < 1.0:
            raise ValueError(f"--sparsities: {sp} must be in [0, 1)")
    backend = resolve_backend(args.backend, device)
    if args.threads is not None:
        torch.set_num_threads(_positive("--threads", args.threads))
    C, T, h, w = preset.latent_shape(args.height, args.width, args.num_frames)
    grid = (T, h // 2, w // 2)  # patch (1, 2, 2)
    tokens = math.prod(grid)

    config = transformer_config(preset, layers)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(args.seed)  # module initialisers draw from the global generator
        model = _cast(WanTransformer3DModel(**config), dtype).eval()
    if args.compile:
        compile_blocks(model, backend=args.compile)
    gen = torch.Generator("cpu").manual_seed(args.seed)
    latents = torch.randn(1, C, T, h, w, generator=gen).to(device, dtype)  # [B, C, T, h, w]
    context = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, dtype)
    timestep = torch.full((1,), 500.0, device=device)
    if preset.expand_timesteps:  # Wan2.2 TI2V: one timestep per token
        timestep = timestep[:, None].expand(1, tokens)

    def forward() -> None:
        with torch.no_grad():
            model(
                hidden_states=latents,
                timestep=timestep,
                encoder_hidden_states=context,
                return_dict=False,
            )

    cases = [("dense", None)] + [("vsa", sp) for sp in args.sparsities]
    labels = ["dense" if mode == "dense" else f"vsa_{sp:g}" for mode, sp in cases]
    samples: dict[str, list[float]] = {label: [] for label in labels}
    # Rounds interleave the cases, so a slow spell of a shared machine hits all of them.
    for rnd in range(warmup + repeats):
        for (mode, sp), label in zip(cases, labels):
            set_attention(
                model, mode, sparsity=sp, tile_size=tuple(args.tile_size), backend=backend
            )
            synchronize(device)
            t0 = time.perf_counter()
            forward()
            synchronize(device)
            elapsed = time.perf_counter() - t0
            if rnd >= warmup:
                samples[label].append(elapsed)
            kind = "warmup" if rnd < warmup else f"round {rnd - warmup + 1}/{repeats}"
            print(f"  {kind:<12} {label:<10} {elapsed:.4f} s / forward", flush=True)
    times = {
        label: {"median_s": statistics.median(v), "min_s": min(v), "runs": len(v)}
        for label, v in samples.items()
    }

    cfg_passes = 1 if args.no_cfg else 2
    t_dense = times["dense"]["median_s"]
    baseline_s = dense_steps * cfg_passes * t_dense
    results = []
    for sp in args.sparsities:
        t_vsa = times[f"vsa_{sp:g}"]["median_s"]
        best = times[f"vsa_{sp:g}"]["min_s"]
        results.append(
            {
                "sparsity": sp,
                "forward_s": t_vsa,
                "forward_speedup": t_dense / t_vsa,
                "denoise_s": vsa_steps * t_vsa,
                "projected_speedup": baseline_s / (vsa_steps * t_vsa),
                # From the fastest run of each case: less sensitive to a busy machine.
                "projected_speedup_min": dense_steps
                * cfg_passes
                * times["dense"]["min_s"]
                / (vsa_steps * best),
            }
        )
    full_shape = preset.name == "wan2.1-t2v-1.3b" and (
        preset.height,
        preset.width,
        preset.num_frames,
    ) == (
        args.height or preset.height,
        args.width or preset.width,
        args.num_frames or preset.num_frames,
    )
    report = {
        "benchmark": "denoise",
        "preset": preset.name,
        "video": {
            "height": args.height or preset.height,
            "width": args.width or preset.width,
            "num_frames": args.num_frames or preset.num_frames,
        },
        "latent_shape": [1, C, T, h, w],
        "grid": list(grid),
        "tokens": tokens,
        "layers": layers,
        "model_layers": preset.num_layers,
        "device": torch.cuda.get_device_name(device)
        if on_cuda
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "compile": args.compile,
        "repeats": repeats,
        "warmup": warmup,
        "torch": torch.__version__,
        "dense_forward_s": t_dense,
        "baseline": {"steps": dense_steps, "cfg_passes": cfg_passes, "denoise_s": baseline_s},
        "vsa_steps": vsa_steps,
        "times": times,
        "results": results,
        "goal": {
            "target_speedup": GOAL_SPEEDUP,
            "applies": full_shape and dense_steps == 50 and vsa_steps == 3 and cfg_passes == 2,
            "met": {f"{r['sparsity']:g}": r["projected_speedup"] >= GOAL_SPEEDUP for r in results},
        },
    }
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


def _print(r: dict) -> None:
    v = r["video"]
    b = r["baseline"]
    print(
        f"\nWan transformer forward, {r['preset']} ({r['layers']}/{r['model_layers']} layers), "
        f"{v['num_frames']}x{v['height']}x{v['width']} -> grid {tuple(r['grid'])} = "
        f"{r['tokens']} tokens, {r['device']}, {r['dtype']}, VSA backend {r['backend']}"
        + (f", compiled ({r['compile']})" if r["compile"] else "")
    )
    print(f"  dense forward: {r['dense_forward_s']:.4f} s")
    head = (
        f"{'sparsity':>8} {'VSA fwd s':>10} {'fwd dense/VSA':>14} {'projected':>10} "
        f"{'(min runs)':>10}"
    )
    print(head)
    print("-" * len(head))
    for x in r["results"]:
        print(
            f"{x['sparsity']:>8.2f} {x['forward_s']:>10.4f} {x['forward_speedup']:>13.2f}x "
            f"{x['projected_speedup']:>9.1f}x {x['projected_speedup_min']:>9.1f}x"
        )
    print(
        f"projected = {b['steps']} steps x {b['cfg_passes']} (CFG) dense forwards / "
        f"{r['vsa_steps']} VSA forwards"
    )
    if r["goal"]["applies"]:
        for sp, met in r["goal"]["met"].items():
            verdict = "MET" if met else "NOT MET"
            print(f"goal >= {r['goal']['target_speedup']:g}x at sparsity {sp}: {verdict}")
