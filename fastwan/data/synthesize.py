"""Synthetic datasets: a teacher generates the latents of each prompt, written in the same
schema as preprocessed videos (DMD2 / FastWan distil on teacher samples).

The core takes callables, so any teacher (or a test double) serves:

* ``generate(prompt, seed)``: the teacher's sample for ``prompt`` from a generator seeded
  with ``seed`` (multi-step, dense attention, CFG), as an *unnormalised* latent
  ``[C, T, H, W]`` (the VAE's space: what ``vae.decode`` takes, what preprocessing stores);
* ``encode_text(prompts)``: one ``[L_i, dim]`` embedding per prompt (valid tokens only);
* image-to-video (``encode_image`` given, every prompt with an ``image``):
  ``encode_image(pil_image)`` -> ``{"first_frame_latent", "clip_feature", "pil_image"}``
  of the image at the data's size (:meth:`fastwan.data.encoders.WanImageConditionEncoder.
  encode_image`), and ``generate(prompt, seed, image=pil_image, image_embeds=clip_feature)``
  the teacher's sample from that first frame. Rows are then ``i2v`` rows (FastVideo's
  ``pyarrow_schema_i2v``): the sample's latents plus the image's condition, so a model
  trained on them sees the condition it gets at inference.

Each prompt yields ``samples_per_prompt`` rows, with ids ``<prompt id>/s<k>`` and seeds
:func:`sample_seed` (distinct per prompt and sample, the same on every run and rank). The
caption is the prompt; ``generation_settings`` records the teacher, sampler, steps,
guidance, negative prompt, shift and seed. Under ``world_size`` ranks (torchrun), rank
``r`` takes every ``world_size``-th sample; the output is resumable. An image that has
gone or does not decode is skipped and named in the summary.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastwan.data.parquet_io import ResumableOutput
from fastwan.data.preprocess import (
    DEFAULT_ROWS_PER_SHARD,
    EncodePromptImage,
    EncodeText,
    _as_embeddings,
    _as_latent,
    as_condition,
    load_prompt_image,
    save_empty_prompt,
)
from fastwan.data.schema import i2v_row, video_row
from fastwan.data.sources import PromptItem

__all__ = ["GenerateLatent", "REQUIRED_SETTINGS", "sample_seed", "synthesize"]

# (prompt, seed[, image=, image_embeds=]) -> [C, T, H, W] unnormalised
GenerateLatent = Callable[..., torch.Tensor]

# Settings every synthetic dataset records (the rows' width/height/num_frames/fps come from
# them); any further keys (teacher, steps, guidance_scale, ...) are recorded as given.
REQUIRED_SETTINGS = ("height", "width", "num_frames", "fps")


def sample_seed(base_seed: int, prompt_id: str, k: int) -> int:
    """The seed of sample ``k`` of a prompt: a 31-bit hash of (base seed, prompt id, k)."""
    digest = hashlib.sha256(f"{int(base_seed)}:{prompt_id}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def synthesize(
    prompts: Sequence[PromptItem],
    generate: GenerateLatent,
    encode_text: EncodeText,
    out_dir: str | Path,
    *,
    settings: Mapping[str, Any],
    samples_per_prompt: int = 1,
    seed: int = 0,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    encode_image: EncodePromptImage | None = None,
) -> dict[str, Any]:
    """Generate and write ``samples_per_prompt`` teacher samples per prompt; return the
    summary (also in ``out_dir/summary.json`` or ``summary-rankNNN.json``).
    ``encode_image``: image-to-video samples (see the module docstring)."""
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"settings must give {list(REQUIRED_SETTINGS)}; missing {missing}")
    for name, value in (("samples_per_prompt", samples_per_prompt), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if samples_per_prompt < 1:
        raise ValueError("samples_per_prompt must be >= 1")
    if encode_image is not None:
        lacking = [p.id for p in prompts if getattr(p, "image", None) is None]
        if lacking:
            raise ValueError(
                f"prompt {lacking[0]!r} (and {len(lacking) - 1} more) has no image; "
                "image-to-video synthesis takes a file of image + prompt pairs "
                "(fastwan.data.sources.load_image_prompts)"
            )
    recorded = dict(settings, seed=seed, samples_per_prompt=samples_per_prompt)
    if encode_image is not None:
        recorded["task"] = "i2v"
    job = ResumableOutput(
        out_dir,
        "video" if encode_image is None else "i2v",
        recorded,
        rows_per_shard=rows_per_shard,
        rank=rank,
        world_size=world_size,
        extra_columns=("generation_settings",),
    )
    work = [(p, k) for p in prompts for k in range(samples_per_prompt)]
    mine = work[rank::world_size]
    pending = [(p, k) for p, k in mine if not job.is_done(f"{p.id}/s{k}")]
    per_row = dict(settings)
    complete = False
    cache: dict[str, torch.Tensor] = {}  # prompt id -> [L, dim] (samples of one prompt)
    images: dict[str, tuple[Any, dict[str, Any]] | None] = {}  # prompt id -> (image, condition)
    unusable: set[str] = set()  # prompt ids whose image is missing or does not decode
    try:
        save_empty_prompt(job, encode_text)
        bar = tqdm(pending, desc="synthesize", unit="video", disable=not progress, file=sys.stderr)
        for item, k in bar:
            row_id = f"{item.id}/s{k}"
            s = sample_seed(seed, item.id, k)
            condition = None
            gen_kwargs: dict[str, Any] = {}
            if encode_image is not None:
                if item.id in unusable:
                    continue  # its image was skipped (recorded once)
                if item.id not in images:
                    images.clear()
                    images[item.id] = _image_of(job, item, encode_image)
                if images[item.id] is None:
                    unusable.add(item.id)
                    continue
                image, condition = images[item.id]
                gen_kwargs = {"image": image, "image_embeds": condition["clip_feature"]}
            latent = _as_latent(generate(item.prompt, s, **gen_kwargs), row_id)  # [C, T, H, W]
            if item.id not in cache:
                cache.clear()
                (cache[item.id],) = _as_embeddings(encode_text([item.prompt]), 1, row_id)
            fields = dict(
                id=row_id,
                latent=latent,
                text_embedding=cache[item.id],  # [L, dim]
                caption=item.prompt,
                file_name=row_id,
                width=settings["width"],
                height=settings["height"],
                num_frames=settings["num_frames"],
                fps=settings["fps"],
            )
            gen = dict(per_row, seed=s, sample=k)
            if condition is None:
                job.add(video_row(**fields, generation_settings=json.dumps(gen)))
                continue
            _check_same_grid(latent, condition["first_frame_latent"], row_id)
            gen.update(task="i2v", image=item.image_name or str(item.image))
            job.add(i2v_row(**fields, **condition, generation_settings=json.dumps(gen)))
        complete = True
    finally:
        summary = job.finish(
            total_items=len(mine), complete=complete, inputs_already_done=len(mine) - len(pending)
        )
    return summary


def _image_of(
    job: ResumableOutput, item: PromptItem, encode_image: EncodePromptImage
) -> tuple[Any, dict[str, Any]] | None:
    """(PIL image, checked condition) of a pair, or None, recorded as skipped, when the
    image has gone or does not decode."""
    where = item.where or f"prompt {item.id}"
    image = load_prompt_image(item)
    if isinstance(image, tuple):
        reason, detail = image
        job.skip(item.id, reason, f"{where}: field 'image': {detail}")
        return None
    return image, as_condition(encode_image(image), where)


def _check_same_grid(latent: torch.Tensor, first: torch.Tensor, where: str) -> None:
    """The sample ``[C, T, h, w]`` and its condition ``[C, T or 1, h, w]`` share a grid."""
    if latent.shape[0] != first.shape[0] or latent.shape[2:] != first.shape[2:]:
        raise ValueError(
            f"{where}: the teacher's latents {list(latent.shape)} and the image condition "
            f"{list(first.shape)} differ in channels or size; encode the image with the "
            "teacher's VAE at the sampling size"
        )
