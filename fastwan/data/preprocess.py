"""Preprocessing: videos + captions -> latent shards; prompts -> text-embedding shards.

The core functions take the encoders as callables, so they run with any model (or a test
double):

* ``encode_video(frames)``: frames ``[T, H, W, 3]`` uint8 -> latent ``[C, T', H', W']``, the
  VAE posterior mean, unnormalised;
* ``encode_text(prompts)``: ``list[str]`` -> one ``[L_i, dim]`` tensor per prompt, its valid
  tokens only.

:mod:`fastwan.data.encoders` builds both from a Diffusers-format Wan folder, and the image
side of image-to-video data (:class:`~fastwan.data.encoders.WanImageConditionEncoder`):

* ``encode_image(frame, num_frames)``: a clip's first frame ``[H, W, 3]`` uint8 ->
  ``{"first_frame_latent", "clip_feature"}`` (``preprocess_videos``);
* ``encode_prompt_image(image)``: the PIL image of an image + prompt pair ->
  ``{"first_frame_latent", "clip_feature", "pil_image"}`` at the data's size
  (``preprocess_prompts`` of image + prompt pairs).

A video that cannot be decoded, is too short, or is missing (and a caption that is empty)
is skipped and recorded in the summary with its reason; it never stops the run and never
leaves a partial row. So is an image whose pixels fail to decode (its header was checked
when the prompts file was read). Output is resumable (see :mod:`fastwan.data.parquet_io`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fastwan.data.parquet_io import EMPTY_PROMPT_FILE, ResumableOutput
from fastwan.data.schema import i2v_row, i2v_text_row, text_row, video_row
from fastwan.data.sources import PromptItem, VideoItem
from fastwan.data.video_decode import VideoDecodeError, decode_clip
from fastwan.shapes import latent_grid

__all__ = [
    "DEFAULT_ROWS_PER_SHARD",
    "EncodeImage",
    "EncodePromptImage",
    "EncodeText",
    "EncodeVideo",
    "VIDEO_SUFFIXES",
    "check_clip_size",
    "preprocess_prompts",
    "preprocess_videos",
    "save_empty_prompt",
]

EncodeVideo = Callable[[np.ndarray], torch.Tensor]  # [T, H, W, 3] uint8 -> [C, T', H', W']
EncodeText = Callable[[list[str]], Sequence[torch.Tensor]]  # prompts -> [L_i, dim] each
# first frame [H, W, 3] uint8, num_frames -> {"first_frame_latent", "clip_feature"}
EncodeImage = Callable[[np.ndarray, int], Mapping[str, Any]]
# the image of an image + prompt pair (PIL, RGB) -> {"first_frame_latent", "clip_feature",
# "pil_image"} at the data's size
EncodePromptImage = Callable[[Path], Mapping[str, Any]]

DEFAULT_ROWS_PER_SHARD = 256
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif")


def check_clip_size(
    height: int,
    width: int,
    num_frames: int,
    fps: float,
    vae_stride: tuple[int, int, int] = (4, 8, 8),
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> None:
    """Clip sizes the Wan VAE and patching accept (:func:`fastwan.shapes.latent_grid`); a
    ValueError naming the option and the nearest valid values otherwise."""
    latent_grid(
        num_frames,
        height,
        width,
        vae_stride,
        patch_size,
        name=lambda field: "--" + field.replace("_", "-"),
    )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"--fps must be a positive number, got {fps!r}")


def _as_latent(latent: Any, where: str) -> torch.Tensor:
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4:
        shape = tuple(latent.shape) if hasattr(latent, "shape") else type(latent).__name__
        raise ValueError(f"encode_video must return a [C, T, H, W] tensor, got {shape} ({where})")
    latent = latent.detach().to("cpu", torch.float32)
    if not torch.isfinite(latent).all():
        raise ValueError(f"encode_video returned NaN/inf for {where}; check the VAE and its dtype")
    return latent


def _as_embeddings(embeds: Any, count: int, where: str) -> list[torch.Tensor]:
    embeds = list(embeds)
    if len(embeds) != count:
        raise ValueError(f"encode_text returned {len(embeds)} embeddings for {count} prompts")
    out = []
    for e in embeds:
        if not isinstance(e, torch.Tensor) or e.dim() != 2:
            shape = tuple(e.shape) if hasattr(e, "shape") else type(e).__name__
            raise ValueError(f"encode_text must return [L, dim] tensors, got {shape} ({where})")
        out.append(e.detach().to("cpu", torch.float32))
    return out


def as_condition(condition: Any, where: str, pil_required: bool = True) -> dict[str, Any]:
    """An image encoder's output checked: ``first_frame_latent`` ``[C, T, h, w]`` finite,
    ``clip_feature`` ``[N, D]`` or None, ``pil_image`` ``[H, W, 3]`` uint8."""
    if not isinstance(condition, Mapping) or "first_frame_latent" not in condition:
        raise ValueError(
            f"encode_image must return a mapping with first_frame_latent, got "
            f"{type(condition).__name__} ({where})"
        )
    latent = condition["first_frame_latent"]
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4:
        raise ValueError(f"first_frame_latent must be a [C, T, h, w] tensor ({where})")
    latent = latent.detach().to("cpu", torch.float32)
    if not torch.isfinite(latent).all():
        raise ValueError(f"encode_image returned NaN/inf for {where}; check the VAE and its dtype")
    clip = condition.get("clip_feature")
    if clip is not None:
        if not isinstance(clip, torch.Tensor) or clip.dim() != 2:
            raise ValueError(f"clip_feature must be a [N, D] tensor or None ({where})")
        clip = clip.detach().to("cpu", torch.float32)
    out = {"first_frame_latent": latent, "clip_feature": clip}
    pil = condition.get("pil_image")
    if pil is not None or pil_required:
        pil = torch.as_tensor(np.asarray(pil)) if not isinstance(pil, torch.Tensor) else pil
        if pil.dtype != torch.uint8 or pil.dim() != 3 or pil.shape[-1] != 3:
            raise ValueError(f"pil_image must be an [H, W, 3] uint8 image ({where})")
        out["pil_image"] = pil.cpu()
    return out


def save_empty_prompt(job: ResumableOutput, encode_text: EncodeText) -> None:
    """Store the empty prompt's embedding ``[L, dim]`` (the dataset's CFG-dropout text)."""
    if job.rank == 0 and not (job.out_dir / EMPTY_PROMPT_FILE).is_file():
        (empty,) = _as_embeddings(encode_text([""]), 1, "the empty prompt")
        job.save_array(EMPTY_PROMPT_FILE, empty.numpy())


def preprocess_videos(
    items: Sequence[VideoItem],
    encode_video: EncodeVideo,
    encode_text: EncodeText,
    out_dir: str | Path,
    *,
    height: int,
    width: int,
    num_frames: int,
    fps: float,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    settings: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    summary_extra: Mapping[str, Any] | None = None,
    encode_image: EncodeImage | None = None,
) -> dict[str, Any]:
    """Decode, resample to ``fps``, resize + centre-crop to ``height x width``, cut to
    ``num_frames``, encode; write one row per (video, caption). Returns the summary
    (also written to ``out_dir/summary.json``).

    ``encode_image`` (e.g. :class:`fastwan.data.encoders.WanImageConditionEncoder`):
    write image-to-video rows (FastVideo's ``pyarrow_schema_i2v``) whose condition is the
    clip's first frame.

    ``settings``: extra values recorded in ``dataset.json`` (e.g. the model) that a resumed
    run must repeat. Under ``world_size`` > 1, this rank takes every ``world_size``-th video.
    """
    check_clip_size(height, width, num_frames, fps, vae_stride=(1, 1, 1), patch_size=(1, 1, 1))
    all_settings = dict(height=height, width=width, num_frames=num_frames, fps=float(fps))
    all_settings.update(settings or {})
    if encode_image is not None:
        all_settings["task"] = "i2v"
    job = ResumableOutput(
        out_dir,
        "i2v" if encode_image is not None else "video",
        all_settings,
        rows_per_shard=rows_per_shard,
        rank=rank,
        world_size=world_size,
    )
    mine = list(items)[rank::world_size]
    pending = [item for item in mine if any(not job.is_done(i) for i in item.ids)]
    complete = False
    try:
        save_empty_prompt(job, encode_text)
        bar = tqdm(pending, desc="preprocess", unit="video", disable=not progress, file=sys.stderr)
        for item in bar:
            _preprocess_one(job, item, encode_video, encode_text, all_settings, encode_image)
            bar.set_postfix(
                rows=job.writer.rows_written + job.writer.pending,
                skipped=len(job.skipped),
                refresh=False,
            )
        complete = True
    finally:
        summary = job.finish(
            total_items=len(mine),
            complete=complete,
            inputs_already_done=len(mine) - len(pending),
            **(summary_extra or {}),
        )
    return summary


def _preprocess_one(
    job: ResumableOutput,
    item: VideoItem,
    encode_video: EncodeVideo,
    encode_text: EncodeText,
    s: Mapping[str, Any],
    encode_image: EncodeImage | None = None,
) -> None:
    todo = [(i, c) for i, c in zip(item.ids, item.captions) if not job.is_done(i)]
    for row_id, caption in todo:
        if not caption.strip():
            job.skip(row_id, "empty_caption", f"{item.file_name}: the caption is empty")
    todo = [(i, c) for i, c in todo if c.strip()]
    if not todo:
        return
    if not item.path.is_file():
        job.skip(item.file_name, "missing_file", f"{item.path}: no such file")
        return
    try:
        clip = decode_clip(
            item.path,
            num_frames=s["num_frames"],
            fps=s["fps"],
            height=s["height"],
            width=s["width"],
        )
    except VideoDecodeError as err:
        job.skip(item.file_name, err.reason, str(err))
        return
    latent = _as_latent(encode_video(clip.frames), item.file_name)  # [C, T', H', W']
    embeds = _as_embeddings(encode_text([c for _, c in todo]), len(todo), item.file_name)
    condition = None
    if encode_image is not None:
        first = clip.frames[0]  # [H, W, 3] uint8: the condition is the clip's first frame
        condition = dict(encode_image(first, s["num_frames"]), pil_image=first)
    for (row_id, caption), emb in zip(todo, embeds):
        fields = dict(
            id=row_id,
            latent=latent,
            text_embedding=emb,  # [L, dim]
            caption=caption,
            file_name=item.file_name,
            width=s["width"],
            height=s["height"],
            num_frames=s["num_frames"],
            fps=s["fps"],
        )
        job.add(video_row(**fields) if condition is None else i2v_row(**condition, **fields))


def preprocess_prompts(
    prompts: Sequence[PromptItem],
    encode_text: EncodeText,
    out_dir: str | Path,
    *,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    batch_size: int = 16,
    settings: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    encode_image: EncodePromptImage | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
) -> dict[str, Any]:
    """Text-only shards (data-free distillation): one row per prompt, ``batch_size``
    prompts per ``encode_text`` call. Returns the summary.

    ``encode_image`` (data-free image-to-video; every prompt has an ``image``, e.g. from
    :func:`fastwan.data.sources.load_image_prompts`): ``i2v_text`` rows that add the
    image's condition, computed for clips of ``num_frames x height x width`` (required,
    recorded in the rows and ``dataset.json``). An image whose pixels fail to decode is
    skipped (``unreadable_image``) and named in the summary."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    all_settings = dict(settings or {})
    if encode_image is not None:
        sizes = dict(height=height, width=width, num_frames=num_frames)
        missing = [k for k, v in sizes.items() if v is None]
        if missing:
            raise ValueError(f"image-to-video prompts need {missing} (the clip size)")
        check_clip_size(height, width, num_frames, 1.0, vae_stride=(1, 1, 1), patch_size=(1, 1, 1))
        lacking = [p.id for p in prompts if getattr(p, "image", None) is None]
        if lacking:
            raise ValueError(
                f"prompt {lacking[0]!r} (and {len(lacking) - 1} more) has no image; "
                "image-to-video prompts come from a file of image + prompt pairs "
                "(fastwan.data.sources.load_image_prompts)"
            )
        all_settings.update(sizes, task="i2v")
    job = ResumableOutput(
        out_dir,
        "text" if encode_image is None else "i2v_text",
        all_settings,
        rows_per_shard=rows_per_shard,
        rank=rank,
        world_size=world_size,
    )
    mine = list(prompts)[rank::world_size]
    pending = [p for p in mine if not job.is_done(p.id)]
    complete = False
    try:
        save_empty_prompt(job, encode_text)
        with tqdm(
            total=len(pending),
            desc="encode prompts",
            unit="prompt",
            disable=not progress,
            file=sys.stderr,
        ) as bar:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                _encode_prompt_batch(
                    job, chunk, encode_text, encode_image, (height, width, num_frames)
                )
                bar.update(len(chunk))
        complete = True
    finally:
        summary = job.finish(
            total_items=len(mine), complete=complete, inputs_already_done=len(mine) - len(pending)
        )
    return summary


def _encode_prompt_batch(
    job: ResumableOutput,
    batch: Sequence[PromptItem],
    encode_text: EncodeText,
    encode_image: EncodePromptImage | None,
    size: tuple[int | None, int | None, int | None],
) -> None:
    """Rows of one batch of prompts (text, or text + image condition)."""
    conditions: dict[str, dict[str, Any]] = {}
    if encode_image is not None:  # images first: a bad image costs no text encoding
        for item in batch:
            condition = _encode_image_file(job, item, encode_image)
            if condition is not None:
                conditions[item.id] = condition
        batch = [item for item in batch if item.id in conditions]
    if not batch:
        return
    embeds = _as_embeddings(
        encode_text([p.prompt for p in batch]), len(batch), f"prompt {batch[0].id}"
    )
    height, width, num_frames = size
    for item, emb in zip(batch, embeds):  # emb: [L, dim]
        if encode_image is None:
            job.add(text_row(id=item.id, text_embedding=emb, caption=item.prompt))
            continue
        job.add(
            i2v_text_row(
                id=item.id,
                text_embedding=emb,
                caption=item.prompt,
                file_name=item.image_name or str(item.image),
                width=width,
                height=height,
                num_frames=num_frames,
                **conditions[item.id],
            )
        )


def _encode_image_file(
    job: ResumableOutput, item: PromptItem, encode_image: EncodePromptImage
) -> dict[str, Any] | None:
    """The checked condition of ``item.image``, or None (recorded as skipped) when the file
    has gone or its pixels do not decode."""
    where = item.where or f"prompt {item.id}"
    image = load_prompt_image(item)
    if isinstance(image, tuple):
        reason, detail = image
        job.skip(item.id, reason, f"{where}: field 'image': {detail}")
        return None
    return as_condition(encode_image(image), where)


def load_prompt_image(item: PromptItem) -> Any:
    """The RGB PIL image of an image + prompt pair, or ``(reason, detail)`` when the file
    is missing or does not decode (its header was checked when the file was read)."""
    from PIL import Image

    if item.image is None or not item.image.is_file():
        return "missing_image", f"{item.image}: no such file; restore it or remove the line"
    try:
        with Image.open(item.image) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        return "unreadable_image", (
            f"{item.image}: its pixels do not decode ({type(err).__name__}: {err}); replace "
            "the file or remove the line"
        )
