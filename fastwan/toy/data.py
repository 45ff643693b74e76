"""Training data of the toy world, written as fastwan parquet shards.

* :func:`write_clip_dataset`: ``video`` shards of rendered clips (pixel-VAE latents + prompt
  embeddings) from the *training* combinations only -- what the teacher learns from with
  ``fastwan finetune recipes/toy_teacher.yaml`` (and its stages ``toy_teacher_refine.yaml``,
  ``toy_teacher_anchor.yaml``);
* :func:`write_prompt_dataset`: ``text`` shards of training prompts -- what the data-free
  distillation ``fastwan distill recipes/toy_distill.yaml`` needs.

Both go through the same writer, schema and resumable output as ``fastwan preprocess``.
With ``task="i2v"`` (a ``ti2v`` toy folder, :func:`fastwan.toy.assets.build_toy_pipeline`)
they write image-to-video rows of the image-to-video world (:mod:`fastwan.toy.i2v`): ``i2v``
clips with their first frame as the condition (``first_frame_latent``: the frame's
normalised latent, which for the pixel VAE is exactly the clip's first latent frame;
``pil_image``: the frame), and ``i2v_text`` prompts each with the first frame of a clip of
its combination (data-free image-to-video distillation).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fastwan.toy import world

__all__ = ["write_clip_dataset", "write_prompt_dataset", "training_items"]

TASKS = ("t2v", "i2v")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} (i2v: image-to-video rows), got {task!r}")


def _first_frame_condition(vae, frame: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(normalised latent ``[C, 1, h, w]``, uint8 frame ``[H, W, 3]``) of a first frame
    ``[H, W, 3]`` in [0, 1], computed as ``generate(image=...)`` computes a TI2V condition."""
    from fastwan.models.image_encoder import vae_condition_latents

    pixels = np.round(frame * 255).astype(np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1  # [1, 3, H, W]
    latent = vae_condition_latents(vae, image, world.NUM_FRAMES, expand_timesteps=True)
    return latent[0], pixels


def training_items(num: int, seed: int) -> list[tuple[world.Combo, str, int]]:
    """``num`` (combo, prompt, clip seed) triples over the training combinations only,
    cycling through them so every combination is equally represented."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    rng = np.random.default_rng(seed)
    combos = world.train_combos()
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(num // len(combos) + 1)])
    items = []
    for i in range(num):
        combo = combos[int(order[i])]
        items.append((combo, world.random_prompt(combo, rng), int(rng.integers(0, 2**31))))
    return items


def _encoder(model_path: Path):
    from fastwan.data.encoders import WanTextEncoder
    from fastwan.models.presets import get_preset

    length = get_preset("toy-teacher").text_length
    return WanTextEncoder.from_pretrained(
        model_path, device="cpu", dtype=torch.float32, max_length=length, batch_size=64
    )


def write_clip_dataset(
    out_dir: str | Path,
    model_path: str | Path,
    *,
    num_clips: int,
    seed: int = 0,
    rows_per_shard: int = 512,
    progress: bool = True,
    task: str = "t2v",
) -> dict[str, Any]:
    """Render ``num_clips`` training clips, encode them with the toy folder's pixel VAE
    and text encoder, write ``video`` shards to ``out_dir`` (``task="i2v"``: ``i2v``
    shards of image-to-video clips with their first-frame condition); returns the
    summary."""
    from fastwan.data.encoders import WanVideoEncoder
    from fastwan.data.parquet_io import ResumableOutput
    from fastwan.data.preprocess import save_empty_prompt
    from fastwan.data.schema import i2v_row, video_row
    from fastwan.toy.i2v import render_i2v_clip

    _check_task(task)

    model_path = Path(model_path)
    text = _encoder(model_path)
    video = WanVideoEncoder.from_pretrained(model_path, device="cpu")
    items = training_items(num_clips, seed)
    settings = dict(
        world="toy", seed=seed, num_clips=num_clips, size=world.SIZE, frames=world.NUM_FRAMES
    )
    if task == "i2v":
        settings["task"] = task
    kind = "i2v" if task == "i2v" else "video"
    job = ResumableOutput(out_dir, kind, settings, rows_per_shard=rows_per_shard)
    save_empty_prompt(job, text)
    pending = [(i, it) for i, it in enumerate(items) if not job.is_done(f"toy-{seed}-{i:06d}")]
    batch = 64
    bar = tqdm(
        total=len(pending), desc="toy clips", unit="clip", disable=not progress, file=sys.stderr
    )
    for start in range(0, len(pending), batch):
        chunk = pending[start : start + batch]
        embeds = text([prompt for _, (_, prompt, _) in chunk])
        for (i, (combo, prompt, clip_seed)), emb in zip(chunk, embeds):
            render = render_i2v_clip if task == "i2v" else world.render_clip
            frames = render(combo, clip_seed)  # [T, H, W, 3] in [0, 1]
            latent = video(np.round(frames * 255).astype(np.uint8))  # [C, T, h, w]
            cond = {}
            if task == "i2v":
                first, pixels = _first_frame_condition(video.vae, frames[0])
                cond = dict(clip_feature=None, first_frame_latent=first, pil_image=pixels)
            job.add(
                (i2v_row if task == "i2v" else video_row)(
                    **cond,
                    id=f"toy-{seed}-{i:06d}",
                    latent=latent,
                    text_embedding=emb,
                    caption=prompt,
                    file_name=f"toy/{combo.shape}-{combo.color}-{combo.direction}-"
                    f"{combo.background}-{clip_seed}",
                    width=world.SIZE,
                    height=world.SIZE,
                    num_frames=world.NUM_FRAMES,
                    fps=world.FPS,
                )
            )
        bar.update(len(chunk))
    bar.close()
    return job.finish(total_items=num_clips)


def write_prompt_dataset(
    out_dir: str | Path,
    model_path: str | Path,
    *,
    num_prompts: int,
    seed: int = 1,
    progress: bool = True,
    task: str = "t2v",
) -> dict[str, Any]:
    """``num_prompts`` training-combination prompts as ``text`` shards (data-free DMD);
    ``task="i2v"``: ``i2v_text`` shards, each prompt with the first frame of an
    image-to-video clip of its combination."""
    from fastwan.data.preprocess import preprocess_prompts
    from fastwan.data.sources import PromptItem

    _check_task(task)
    if task == "i2v":
        return _write_i2v_prompts(out_dir, Path(model_path), num_prompts, seed, progress)

    items = [
        PromptItem(id=f"toy-prompt-{seed}-{i:06d}", prompt=prompt)
        for i, (_, prompt, _) in enumerate(training_items(num_prompts, seed))
    ]
    return preprocess_prompts(
        items,
        _encoder(Path(model_path)),
        out_dir,
        batch_size=64,
        settings=dict(world="toy", seed=seed, num_prompts=num_prompts),
        progress=progress,
    )


def _write_i2v_prompts(
    out_dir: str | Path, model_path: Path, num_prompts: int, seed: int, progress: bool
) -> dict[str, Any]:
    from fastwan.data.encoders import WanVideoEncoder
    from fastwan.data.parquet_io import ResumableOutput
    from fastwan.data.preprocess import save_empty_prompt
    from fastwan.data.schema import i2v_text_row
    from fastwan.toy.i2v import render_i2v_clip

    text = _encoder(model_path)
    vae = WanVideoEncoder.from_pretrained(model_path, device="cpu").vae
    items = training_items(num_prompts, seed)
    settings = dict(world="toy", seed=seed, num_prompts=num_prompts, task="i2v")
    job = ResumableOutput(out_dir, "i2v_text", settings, rows_per_shard=512)
    save_empty_prompt(job, text)
    pending = [(i, it) for i, it in enumerate(items) if not job.is_done(f"toy-i2v-{seed}-{i:06d}")]
    bar = tqdm(
        total=len(pending), desc="toy i2v prompts", unit="prompt", disable=not progress,
        file=sys.stderr,
    )  # fmt: skip
    for start in range(0, len(pending), 64):
        chunk = pending[start : start + 64]
        embeds = text([prompt for _, (_, prompt, _) in chunk])
        for (i, (combo, prompt, clip_seed)), emb in zip(chunk, embeds):
            first, pixels = _first_frame_condition(vae, render_i2v_clip(combo, clip_seed)[0])
            job.add(
                i2v_text_row(
                    id=f"toy-i2v-{seed}-{i:06d}",
                    text_embedding=emb,
                    caption=prompt,
                    clip_feature=None,
                    first_frame_latent=first,
                    pil_image=pixels,
                    file_name=f"toy/{combo.shape}-{combo.color}-{combo.background}-{clip_seed}",
                    width=world.SIZE,
                    height=world.SIZE,
                    num_frames=world.NUM_FRAMES,
                )
            )
        bar.update(len(chunk))
    bar.close()
    return job.finish(total_items=num_prompts)
