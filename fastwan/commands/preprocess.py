"""``fastwan preprocess`` (videos + captions -> latent shards) and ``fastwan preprocess-text``
(prompts -> text-embedding shards for data-free distillation; with ``--task i2v``, image +
prompt pairs -> text-embedding + image-condition shards for data-free image-to-video).

Both are resumable: re-run the same command after an interruption and it continues where
it stopped. Under ``torchrun`` every rank takes its share of the inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fastwan.choices import DTYPES


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) without it."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError("RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder of parquet shards")
    p.add_argument(
        "--rows-per-shard", type=int, default=256, help="rows per parquet file (default 256)"
    )
    p.add_argument("--max-sequence-length", type=int, default=512, help="text tokens (Wan: 512)")
    p.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) if available")
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="text encoder dtype (default bf16 on CUDA, fp32 on CPU); stored embeddings are fp32",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="encode videos + captions into latent parquet shards (VAE + text encoder)",
        description=(
            "Decode each video, resample it to --fps, resize and centre-crop it to "
            "--height x --width, cut it to --num-frames, VAE-encode it (posterior mean, "
            "unnormalised) and text-encode its caption. Unreadable, missing and too-short "
            "videos are skipped and listed in OUT/summary.json. Resumable."
        ),
    )
    p.add_argument("--videos", type=Path, required=True, help="folder of the video files")
    p.add_argument(
        "--captions",
        type=Path,
        required=True,
        help="captions file (.json/.jsonl/.csv): video path (relative to --videos) + caption",
    )
    p.add_argument(
        "--model", required=True, help="Diffusers-format Wan folder (vae/, text_encoder/)"
    )
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--num-frames", type=int, default=81, help="4k + 1 frames (default 81)")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate of the clips (default 16)")
    p.add_argument("--vae-dtype", default="fp32", choices=DTYPES, help="default fp32")
    p.add_argument("--vae-tiling", action="store_true", help="tiled VAE encoding (less memory)")
    p.add_argument(
        "--task",
        choices=("t2v", "i2v"),
        default="t2v",
        help="i2v: also write the image condition of each clip's first frame (FastVideo's "
        "i2v schema: first_frame_latent_*, clip_feature_* when the folder has image_encoder/, "
        "pil_image_*)",
    )
    _common(p)
    p.set_defaults(func=run_preprocess)

    t = subparsers.add_parser(
        "preprocess-text",
        help="encode prompts (or image + prompt pairs) into parquet shards (data-free "
        "distillation)",
        description=(
            "Text-encode every prompt (one per line in .txt, or .json/.jsonl/.csv) into "
            "text-only shards: id, text_embedding_*, caption, media_type. With --task i2v "
            "(data-free image-to-video), --prompts pairs an image with each prompt: a "
            '.jsonl file of {"image": "cats/001.png", "prompt": "..."} lines (or .json / '
            ".csv with image and prompt columns; an optional id), image paths relative to "
            "--images (default: the prompts file's folder); each row adds the image's "
            "condition for clips of --num-frames x --height x --width, as the model's "
            "pipeline computes it: first_frame_latent_* (Wan2.2 TI2V: the image's VAE "
            "latent; Wan2.1 I2V: the latent of [image, 0, ..., 0]), clip_feature_* when "
            "the folder has image_encoder/, pil_image_* (the image resized as diffusers' "
            "VideoProcessor does). A missing or unreadable image is an error naming its "
            "line. Resumable."
        ),
    )
    t.add_argument(
        "--prompts",
        type=Path,
        required=True,
        help="prompts file; with --task i2v: image + prompt pairs (.jsonl/.json/.csv)",
    )
    t.add_argument(
        "--model",
        required=True,
        help="Diffusers-format Wan folder (text_encoder/; with --task i2v also vae/ and "
        "image_encoder/ for Wan2.1 I2V)",
    )
    t.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call")
    t.add_argument(
        "--task",
        choices=("t2v", "i2v"),
        default="t2v",
        help="i2v: an image per prompt, its condition in each row (data-free image-to-video)",
    )
    t.add_argument(
        "--images", type=Path, default=None, help="--task i2v: folder the image paths are in"
    )
    t.add_argument("--height", type=int, default=None, help="--task i2v (default: the model's)")
    t.add_argument("--width", type=int, default=None, help="--task i2v (default: the model's)")
    t.add_argument(
        "--num-frames", type=int, default=None, help="--task i2v: 4k + 1 (default: the model's)"
    )
    t.add_argument("--vae-dtype", default="fp32", choices=DTYPES, help="--task i2v; default fp32")
    _common(t)
    t.set_defaults(func=run_preprocess_text)


def _report(summary: dict, out: Path, what: str) -> None:
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped_by_reason"].items())
    print(
        f"{what}: {summary['rows_written']} rows written ({summary['rows_total']} in {out}); "
        f"{summary['skipped']} skipped" + (f" ({reasons})" if reasons else "")
    )


def _uncaptioned(videos: Path, named: set[str]) -> list[str]:
    from fastwan.data.preprocess import VIDEO_SUFFIXES

    found = [
        p.relative_to(videos).as_posix()
        for p in sorted(videos.rglob("*"))
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
    ]
    return [f for f in found if f not in named]


def run_preprocess(args: argparse.Namespace) -> int:
    import torch

    from fastwan.data.encoders import (
        WanImageConditionEncoder,
        WanTextEncoder,
        WanVideoEncoder,
        default_device,
        resolve_dtype,
    )
    from fastwan.data.preprocess import check_clip_size, preprocess_videos
    from fastwan.data.sources import load_captions
    from fastwan.models.loading import resolve_model_path

    rank, world = dist_env()
    items = load_captions(args.captions, args.videos)
    model = resolve_model_path(args.model)
    device = default_device(args.device)
    video_encoder = WanVideoEncoder.from_pretrained(
        model, device=device, dtype=resolve_dtype(args.vae_dtype, device), tiling=args.vae_tiling
    )
    # Wan patchifies latents 2x2: pixel sizes must be multiples of 2 x the VAE stride.
    s = video_encoder.spatial_stride
    check_clip_size(
        args.height,
        args.width,
        args.num_frames,
        args.fps,
        vae_stride=(video_encoder.temporal_stride, s, s),
    )
    text_encoder = WanTextEncoder.from_pretrained(
        model,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        max_length=args.max_sequence_length,
    )
    image_encoder = None
    if args.task == "i2v":
        image_encoder = WanImageConditionEncoder.from_pretrained(
            model, vae=video_encoder.vae, device=device, dtype=resolve_dtype(args.dtype, device)
        )
    uncaptioned = _uncaptioned(args.videos, {item.file_name for item in items})
    if uncaptioned:
        print(f"note: {len(uncaptioned)} videos in {args.videos} have no caption; not used")
    with torch.inference_mode():
        summary = preprocess_videos(
            items,
            video_encoder,
            text_encoder,
            args.out,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            fps=args.fps,
            rows_per_shard=args.rows_per_shard,
            settings={
                "model": str(model.resolve()),
                "max_sequence_length": args.max_sequence_length,
                "text_dtype": str(text_encoder.text_encoder.dtype).removeprefix("torch."),
                "vae_dtype": args.vae_dtype,
            },
            encode_image=image_encoder,
            rank=rank,
            world_size=world,
            progress=not args.no_progress,
            summary_extra={
                "videos_without_caption": len(uncaptioned),
                "videos_without_caption_list": uncaptioned[:1000],
            },
        )
    _report(summary, args.out, "preprocess")
    if summary["skipped"]:
        print(f"skipped videos and reasons: {args.out / 'summary.json'}", file=sys.stderr)
    return 0


def image_sizes(identity, height, width, num_frames) -> tuple[int, int, int]:
    """``(height, width, num_frames)``: the given ones, else the model's preset's; checked
    against the model (VAE stride x patch, rotary table) before any weight loads."""
    from fastwan.models.identity import check_video_size

    p = identity.preset
    sizes = (
        p.height if height is None else height,
        p.width if width is None else width,
        p.num_frames if num_frames is None else num_frames,
    )
    check_video_size(identity, *sizes)
    return sizes


def run_preprocess_text(args: argparse.Namespace) -> int:
    import torch

    from fastwan.data.encoders import WanTextEncoder, default_device, resolve_dtype
    from fastwan.data.preprocess import preprocess_prompts
    from fastwan.data.sources import load_image_prompts, load_prompts
    from fastwan.models.loading import resolve_model_path

    rank, world = dist_env()
    i2v = args.task == "i2v"
    if not i2v:
        given = [
            f"--{k.replace('_', '-')}"
            for k in ("images", "height", "width", "num_frames")
            if getattr(args, k) is not None
        ]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise ValueError(f"{', '.join(given)} {verb} --task i2v (an image per prompt)")
    prompts = load_image_prompts(args.prompts, args.images) if i2v else load_prompts(args.prompts)
    model = resolve_model_path(args.model)
    device = default_device(args.device)
    image_kwargs: dict = {}
    settings: dict = {}
    if i2v:
        image_kwargs, settings = _image_condition_setup(args, model, device)
    encoder = WanTextEncoder.from_pretrained(
        model,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        max_length=args.max_sequence_length,
        batch_size=args.batch_size,
    )
    with torch.inference_mode():
        summary = preprocess_prompts(
            prompts,
            encoder,
            args.out,
            rows_per_shard=args.rows_per_shard,
            batch_size=args.batch_size,
            settings={
                "model": str(model.resolve()),
                "max_sequence_length": args.max_sequence_length,
                "text_dtype": str(encoder.text_encoder.dtype).removeprefix("torch."),
                **settings,
            },
            rank=rank,
            world_size=world,
            progress=not args.no_progress,
            **image_kwargs,
        )
    _report(summary, args.out, "preprocess-text")
    if summary["skipped"]:
        print(f"skipped images and reasons: {args.out / 'summary.json'}", file=sys.stderr)
    return 0


def _image_condition_setup(args: argparse.Namespace, model: Path, device) -> tuple[dict, dict]:
    """(preprocess_prompts' image arguments, recorded settings) of ``--task i2v``: sizes
    checked against the model first, then its VAE (and CLIP encoder) loaded."""
    from fastwan.data.encoders import WanImageConditionEncoder, WanVideoEncoder, resolve_dtype
    from fastwan.models.loading import identify_folder

    _, identity = identify_folder(model)
    height, width, num_frames = image_sizes(identity, args.height, args.width, args.num_frames)
    vae = WanVideoEncoder.from_pretrained(
        model, device=device, dtype=resolve_dtype(args.vae_dtype, device)
    ).vae
    encoder = WanImageConditionEncoder.from_pretrained(
        model, vae=vae, device=device, dtype=resolve_dtype(args.dtype, device)
    )
    if identity.task == "t2v":
        print(
            f"note: {model} is a text-to-video model; the condition is written the Wan2.1 "
            "I2V way (the latent of [image, 0, ..., 0])"
        )

    def encode(image):
        return encoder.encode_image(image, height=height, width=width, num_frames=num_frames)

    sizes = dict(height=height, width=width, num_frames=num_frames)
    settings = {"vae_dtype": args.vae_dtype, "model_task": encoder.task}
    print(
        f"image condition: {encoder.task} ({'CLIP + ' if encoder.image_encoder else ''}VAE) "
        f"for {num_frames} x {height} x {width} clips"
    )
    return dict(encode_image=encode, **sizes), settings
