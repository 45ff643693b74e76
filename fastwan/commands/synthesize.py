"""``fastwan synthesize``: a teacher generates a synthetic latent dataset from prompts (or,
with ``--task i2v``, from image + prompt pairs: image-to-video rows).

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
            "settings. Sizes, shift and negative prompt default to the teacher's preset. "
            "With --task i2v (the default for a Wan2.1 I2V teacher; a Wan2.2 TI2V teacher "
            "takes either) the teacher generates each clip from an image, and --prompts "
            'pairs an image with each prompt: a .jsonl file of {"image": "cats/001.png", '
            '"prompt": "..."} lines (or .json / .csv with image and prompt columns; an '
            "optional id), image paths relative to --images (default: the prompts file's "
            "folder); the image is resized to --height x --width as diffusers' "
            "VideoProcessor does, and rows are image-to-video rows (FastVideo's i2v schema): "
            "the sample's latents plus the image's first_frame_latent_*, clip_feature_* "
            "(Wan2.1 I2V) and pil_image_*, exactly the condition the teacher sampled with. "
            "A missing or unreadable image is an error naming its line."
        ),
    )
    p.add_argument("--teacher", required=True, help="Diffusers-format Wan folder of the teacher")
    p.add_argument(
        "--prompts",
        type=Path,
        required=True,
        help="prompts file (.txt/.json/.jsonl/.csv); with --task i2v: image + prompt pairs",
    )
    p.add_argument(
        "--task",
        choices=("t2v", "i2v"),
        default=None,
        help="i2v: generate from an image per prompt (default: i2v for image-to-video-only "
        "teachers, else t2v)",
    )
    p.add_argument(
        "--images", type=Path, default=None, help="--task i2v: folder the image paths are in"
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
        WanImageConditionEncoder,
        WanTextEncoder,
        default_device,
        resolve_dtype,
    )
    from fastwan.data.sources import load_image_prompts, load_prompts
    from fastwan.data.synthesize import synthesize
    from fastwan.models.loading import identify_folder, resolve_model_path
    from fastwan.pipeline import VideoGenerator

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    rank, world = dist_env()
    teacher = resolve_model_path(args.teacher)
    _, identity = identify_folder(teacher, preset=args.preset)  # JSON files only: fast
    task = args.task or ("i2v" if identity.task == "i2v" else "t2v")
    if task == "i2v" and identity.task == "t2v":
        raise ValueError(
            f"--task i2v: {str(teacher)!r} is a text-to-video model; image-to-video "
            "synthesis needs a Wan2.2 TI2V or Wan2.1 I2V teacher"
        )
    if task == "t2v" and identity.task == "i2v":
        raise ValueError(
            f"--task t2v: {str(teacher)!r} is an image-to-video model (Wan2.1 I2V): it needs "
            "an image per prompt; pass --task i2v and a file of image + prompt pairs"
        )
    if task == "t2v" and args.images is not None:
        raise ValueError("--images needs --task i2v (an image per prompt)")
    if task == "i2v":
        prompts = load_image_prompts(args.prompts, args.images)
    else:
        prompts = load_prompts(args.prompts)
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
    encode_image = None
    if task == "i2v":  # the condition the teacher samples with, computed once per image
        condition = WanImageConditionEncoder(
            c.vae, c.image_encoder, c.image_processor, task=generator.task
        )

        def encode_image(image):
            return condition.encode_image(image, height=height, width=width, num_frames=num_frames)

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
            encode_image=encode_image,
        )
    what = "synthesize" + (" i2v" if task == "i2v" else "")
    _report(summary, args.out, f"{what} (rank {rank}/{world})" if world > 1 else what)
    return 0
