"""``fastwan generate``: prompts in, MP4/GIF files out."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fastwan.arguments import add_compile_argument


def finite_float(text: str) -> float:
    """An argparse type: a finite number (``inf`` / ``nan`` are refused at the boundary)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """An argparse type: a seed in [0, 2**63 - 1]."""
    from fastwan.choices import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {text}")
    return value


def add_runtime_arguments(p: argparse.ArgumentParser, cpu_offload_help: str) -> None:
    """Where and how a loaded model runs: VSA backend, device, dtype, CPU offload,
    compilation, VAE tiling."""
    p.add_argument(
        "--vsa-backend",
        default="auto",
        choices=("auto", "torch", "triton", "flex", "reference"),
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on CUDA)")
    p.add_argument("--cpu-offload", action="store_true", help=cpu_offload_help)
    add_compile_argument(
        p,
        "torch.compile each transformer block (default backend: inductor); the first video "
        "at each new size or attention setting (mode, sparsity) pays a compile",
    )
    p.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode in overlapping spatial tiles (bounded VAE memory at large sizes)",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate videos from text prompts with a Wan / FastWan checkpoint",
        description=(
            "Generate videos with a Diffusers-format Wan folder (or hub id / preset name). "
            "FastWan checkpoints run 3 DMD steps with VSA; Wan checkpoints many UniPC steps "
            "with CFG and dense attention, unless overridden."
        ),
    )
    p.add_argument("--model", required=True, help="pipeline folder, hub repo id or preset name")
    p.add_argument(
        "--preset", default=None, help="preset name (default: recognised from the model)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", type=Path, help="a text file: one prompt per line (# comments)")
    p.add_argument("--negative-prompt", default=None, help="default: the preset's (used with CFG)")
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        help="first frame (PNG/JPEG) for image-to-video models (Wan2.2 TI2V, Wan2.1 I2V); "
        "the size then defaults to the image's aspect ratio",
    )
    p.add_argument(
        "--last-image",
        type=Path,
        default=None,
        help="last frame, for first-last-frame models (Wan2.1 FLF2V)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=Path("output.mp4"),
        help="output file (.mp4/.gif); with several prompts, NAME_000.mp4, NAME_001.mp4, ...",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--fps", type=finite_float, default=None, help="default: the model's")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="multi-step sampling with this many steps (the checkpoint's scheduler or --sampler)",
    )
    p.add_argument(
        "--timesteps",
        default=None,
        help="few-step DMD timesteps, comma-separated (FastWan default: 1000,757,522)",
    )
    p.add_argument("--sampler", choices=("dmd", "euler", "unipc", "scheduler"), default=None)
    p.add_argument("--guidance-scale", type=finite_float, default=None, help="> 1 enables CFG")
    p.add_argument("--flow-shift", type=finite_float, default=None)
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the first video; +1 per prompt"
    )
    p.add_argument("--attention", choices=("vsa", "dense"), default=None)
    p.add_argument("--sparsity", type=finite_float, default=None, help="VSA sparsity in [0, 1)")
    add_runtime_arguments(p, "move each component to the GPU only for its stage")
    p.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="text tokens (default: the model's, 512 for Wan); longer prompts are cut, with a "
        "warning",
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="refuse a checkpoint with incomplete VSA gates or unknown weights (default: warn)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="a diffusers-format Wan LoRA (.safetensors file, or a folder from fastwan export) "
        "applied at SCALE (default --lora-scale); repeat for several, their effects add up",
    )
    p.add_argument(
        "--lora-scale",
        type=finite_float,
        default=1.0,
        help="strength of every --lora without its own :SCALE (1 = as trained; default 1)",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="one video on N devices: sequence parallel, and CFG parallel for an even N "
        "(default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def parse_loras(entries: list[str] | None, default_scale: float) -> list[tuple[Path, float]]:
    """``--lora PATH[:SCALE]`` entries as ``(path, scale)``, each path checked to exist (a
    file or a folder). A path that exists as given is taken whole, so a file whose name
    holds a colon still loads; otherwise the text after the last colon is the scale."""
    out = []
    for entry in entries or []:
        path, scale = Path(entry), default_scale
        if not path.exists() and ":" in entry:
            head, _, tail = entry.rpartition(":")
            try:
                value = float(tail)
            except ValueError:
                value = None
            if value is not None:
                if not math.isfinite(value):
                    raise ValueError(f"--lora {entry!r}: the scale must be a finite number")
                path, scale = Path(head), value
        if not path.exists():
            raise ValueError(
                f"--lora {str(path)!r} does not exist; pass a LoRA .safetensors file or its "
                "folder (fastwan export writes one), optionally as PATH:SCALE"
            )
        if path.is_file() and path.suffix != ".safetensors":
            raise ValueError(f"--lora {str(path)!r} is not a .safetensors file")
        out.append((path, scale))
    return out


def read_prompts(path: Path) -> list[str]:
    """Non-empty lines of a prompt file, ``#`` lines skipped."""
    if not path.is_file():
        raise ValueError(f"--prompts file {str(path)!r} does not exist")
    prompts = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise ValueError(f"--prompts file {str(path)!r} holds no prompt (one per line)")
    return prompts


def parse_timesteps(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--timesteps must be comma-separated numbers, got {text!r}") from None


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i:03d}{output.suffix}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    from fastwan.choices import MAX_SEED
    from fastwan.fsutil import ensure_writable_dir
    from fastwan.models.identity import check_video_size
    from fastwan.models.image_encoder import load_image
    from fastwan.models.loading import identify_folder
    from fastwan.multi_device import check_num_gpus
    from fastwan.pipeline import VideoGenerator, image_video_size
    from fastwan.video_io import MP4_SUFFIXES

    if args.output.suffix.lower() not in MP4_SUFFIXES + (".gif",):
        raise ValueError(f"--output must end in .mp4 or .gif, got {str(args.output)!r}")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt must not be empty")
    timesteps = parse_timesteps(args.timesteps) if args.timesteps else None
    if args.fps is not None and args.fps <= 0:
        raise ValueError(f"--fps must be > 0, got {args.fps:g}")
    paths = output_paths(args.output, len(prompts))
    if args.seed + len(prompts) - 1 > MAX_SEED:
        raise ValueError(
            f"--seed {args.seed} + one per prompt passes 2**63 - 1; pass a smaller seed"
        )
    # Everything that can be checked without weights is checked before any weight loads.
    for path in paths:
        if path.is_dir():
            raise ValueError(f"--output {str(path)!r} is a directory; pass a file name (.mp4)")
    for folder in sorted({path.parent for path in paths}):
        ensure_writable_dir(folder, "--output")
    if args.last_image is not None and args.image is None:
        raise ValueError("--last-image needs --image (the first frame)")
    if (args.image is not None) and ((args.height is None) != (args.width is None)):
        raise ValueError(
            "with --image pass both --height and --width, or neither (then they follow the "
            "image's aspect ratio)"
        )
    loras = parse_loras(args.lora, args.lora_scale)
    if args.num_gpus != 1 and (args.cpu_offload or args.compile):
        raise ValueError(
            "--num-gpus > 1 runs without --cpu-offload / --compile; drop them or pass --num-gpus 1"
        )
    images = {}
    for flag, value in (("--image", args.image), ("--last-image", args.last_image)):
        if value is not None:
            images[flag] = load_image(value, flag)  # a ValueError naming the flag
    _, identity = identify_folder(args.model, preset=args.preset)
    p = identity.preset
    try:
        check_num_gpus(args.num_gpus, p.num_heads)
    except ValueError as err:
        raise ValueError(f"--num-gpus: {err}") from None
    if identity.task == "i2v" and args.image is None:
        raise ValueError(f"{p.name!r} is an image-to-video model: pass --image FIRST_FRAME.png")
    if identity.task == "t2v" and args.image is not None:
        raise ValueError(
            f"--image: {p.name!r} is a text-to-video model; image-to-video needs a Wan2.2 "
            "TI2V or Wan2.1 I2V checkpoint"
        )
    height, width = args.height, args.width
    if args.image is not None and height is None:
        height, width = image_video_size(identity, images["--image"])
        print(
            f"image: {args.image} ({images['--image'].width}x{images['--image'].height}) -> "
            f"video {width}x{height} (the image's aspect ratio)"
        )
    check_video_size(
        identity,
        p.height if height is None else height,
        p.width if width is None else width,
        p.num_frames if args.num_frames is None else args.num_frames,
    )
    generator = VideoGenerator.from_pretrained(
        args.model,
        preset=args.preset,
        attention=args.attention,
        sparsity=args.sparsity,
        backend=args.vsa_backend,
        device=args.device,
        dtype=args.dtype,
        cpu_offload=args.cpu_offload,
        compile=args.compile or False,
        vae_tiling=args.vae_tiling,
        strict=args.strict,
        num_gpus=args.num_gpus,
    )
    try:
        return _generate(args, generator, prompts, paths, images, height, width, timesteps, loras)
    finally:
        close = getattr(generator, "close", None)  # a multi-device generator's workers
        if close is not None:
            close()


def _generate(args, generator, prompts, paths, images, height, width, timesteps, loras) -> int:
    from tqdm import tqdm

    from fastwan.video_io import save_video

    for path, scale in loras:
        name = generator.load_lora(path, scale=scale)
        print(f"lora: {name} from {path} (scale {scale:g})")
    attn = generator.attention
    mode = attn["mode"] + (f" (sparsity {attn['sparsity']:g})" if attn["mode"] == "vsa" else "")
    extras = "".join(
        [
            f"; compiled ({generator.compile_backend})" if generator.compile_backend else "",
            "; VAE tiling" if generator.vae_tiling else "",
        ]
    )
    print(
        f"model: {generator.preset.name} from {generator.components.path}; attention: {mode}"
        + extras
    )
    sources = generator.sampling_sources
    print(
        "defaults: "
        + "; ".join(
            f"{k} {_fmt_value(getattr(generator.preset, k))} ({sources[k]})"
            for k in ("timesteps", "num_inference_steps", "guidance_scale", "flow_shift")
            if k in sources
            and not (k == "num_inference_steps" and generator.preset.few_step)
            and not (k == "timesteps" and not generator.preset.few_step)
        )
    )

    rows = []
    for i, (prompt, path) in enumerate(zip(prompts, paths)):
        bar = tqdm(
            desc=f"video {i + 1}/{len(prompts)}",
            unit="step",
            disable=args.no_progress,
            file=sys.stderr,
        )

        def on_step(info: dict, bar=bar) -> None:
            bar.total = info["total"]
            bar.update(1)

        try:
            out = generator.generate(
                prompt,
                args.negative_prompt,
                image=images.get("--image"),
                last_image=images.get("--last-image"),
                height=height,
                width=width,
                num_frames=args.num_frames,
                num_inference_steps=args.steps,
                timesteps=timesteps,
                guidance_scale=args.guidance_scale,
                seed=args.seed + i,
                sampler=args.sampler,
                flow_shift=args.flow_shift,
                max_sequence_length=args.max_sequence_length,
                callback=on_step,
            )
        finally:
            bar.close()
        save_video(out.video, path, fps=out.fps if args.fps is None else args.fps)
        f, h, w, _ = out.video.shape
        print(f"wrote {path} ({f} frames, {w}x{h}, {out.sampler} at t={_fmt_ts(out.timesteps)})")
        rows.append((path, out.timings))

    print("timing (s):   text_encode   denoise    decode     total")
    for path, t in rows:
        print(
            f"  {path.name:<12}{t['text_encode']:>10.2f}{t['denoise']:>10.2f}"
            f"{t['decode']:>10.2f}{t['total']:>10.2f}"
        )
    if len(rows) > 1:
        tot = {k: sum(t[k] for _, t in rows) for k in ("text_encode", "denoise", "decode", "total")}
        print(
            f"  {'all':<12}{tot['text_encode']:>10.2f}{tot['denoise']:>10.2f}"
            f"{tot['decode']:>10.2f}{tot['total']:>10.2f}"
        )
    return 0


def _fmt_ts(ts: list[float]) -> str:
    if len(ts) > 6:
        return f"[{ts[0]:g}, {ts[1]:g}, ..., {ts[-1]:g}] ({len(ts)} steps)"
    return "[" + ", ".join(f"{t:g}" for t in ts) + "]"


def _fmt_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
