"""``fastwan synthesize``: a teacher generates a synthetic latent dataset from prompts.

The teacher samples each prompt (multi-step, dense attention, CFG with the negative
prompt) and the latents are written, unnormalised, in the schema of ``fastwan
preprocess`` with the caption and the generation settings. Resumable; under ``torchrun``
every rank generates its share (``torchrun --nproc-per-node 8 -m fastwan.cli synthesize``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastwan.choices import DTYPES, VALIDATION_SAMPLERS
from fastwan.commands.preprocess import _report, dist_env


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synthesize",
        help="generate a synthetic latent dataset with a teacher (multi-step, CFG)",
        description=(
            "For each prompt and each of --samples-per-prompt seeds, the teacher generates "
            "a video latent with --steps steps and CFG --guidance; rows hold the latent "
            "(unnormalised), the prompt's text embedding, the caption and the generation "
            "settings. Sizes, shift and negative prompt default to the teacher's preset."
        ),
    )
    p.add_argument("--teacher", required=True, help="Diffusers-format Wan folder of the teacher")
    p.add_argument(
        "--prompts", type=Path, required=True, help="prompts file (.txt/.json/.jsonl/.csv)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder of parquet shards")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale, standard convention uncond + w (cond - uncond) (default: the preset's)",
    )
    p.add_argument("--negative-prompt", default=None, help="default: the preset's")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--fps", type=float, default=None, help="recorded frame rate (preset's)")
    p.add_argument("--flow-shift", type=float, default=None)
    p.add_argument(
        "--sampler",
        default="scheduler",
        choices=VALIDATION_SAMPLERS,
        help="scheduler: the teacher's own (UniPC for Wan)",
    )
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument(
        "--seed", type=int, default=0, help="base seed (each sample's seed derives from it)"
    )
    p.add_argument("--preset", default=None, help="preset name (default: recognised)")
    p.add_argument("--rows-per-shard", type=int, default=64)
    p.add_argument("--max-sequence-length", type=int, default=512)
    p.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) if available")
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="teacher dtype (default bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fastwan.data.encoders import (
        TeacherSampler,
        WanTextEncoder,
        default_device,
        resolve_dtype,
    )
    from fastwan.data.sources import load_prompts
    from fastwan.data.synthesize import synthesize
    from fastwan.models.loading import resolve_model_path
    from fastwan.pipeline import VideoGenerator

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    rank, world = dist_env()
    prompts = load_prompts(args.prompts)
    teacher = resolve_model_path(args.teacher)
    device = default_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    generator = VideoGenerator.from_pretrained(
        teacher, preset=args.preset, attention="dense", device=device, dtype=dtype
    )
    preset = generator.preset
    height = preset.height if args.height is None else args.height
    width = preset.width if args.width is None else args.width
    num_frames = preset.num_frames if args.num_frames is None else args.num_frames
    fps = float(preset.fps if args.fps is None else args.fps)
    guidance = preset.guidance_scale if args.guidance is None else args.guidance
    shift = preset.flow_shift if args.flow_shift is None else args.flow_shift
    negative = preset.negative_prompt if args.negative_prompt is None else args.negative_prompt
    sample = TeacherSampler(
        generator,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=args.steps,
        guidance_scale=guidance,
        negative_prompt=negative,
        flow_shift=shift,
        sampler=args.sampler,
        max_sequence_length=args.max_sequence_length,
    )
    c = generator.components
    encode_text = WanTextEncoder(
        c.tokenizer, c.text_encoder, max_length=args.max_sequence_length, device=generator.device
    )
    settings = {
        "teacher": str(teacher.resolve()),
        "preset": preset.name,
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance_scale": float(guidance),
        "negative_prompt": negative,
        "flow_shift": float(shift),
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "fps": fps,
        "dtype": str(dtype).removeprefix("torch."),
        "max_sequence_length": args.max_sequence_length,
    }
    with torch.inference_mode():
        summary = synthesize(
            prompts,
            sample,
            encode_text,
            args.out,
            settings=settings,
            samples_per_prompt=args.samples_per_prompt,
            seed=args.seed,
            rows_per_shard=args.rows_per_shard,
            rank=rank,
            world_size=world,
            progress=not args.no_progress,
        )
    _report(summary, args.out, f"synthesize (rank {rank}/{world})" if world > 1 else "synthesize")
    return 0
