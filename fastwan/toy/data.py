"""Training data of the toy world, written as fastwan parquet shards.

* :func:`write_clip_dataset`: ``video`` shards of rendered clips (pixel-VAE latents + prompt
  embeddings) from the *training* combinations only -- what the teacher learns from with
  ``fastwan finetune recipes/toy_teacher.yaml``;
* :func:`write_prompt_dataset`: ``text`` shards of training prompts -- what the data-free
  distillation ``fastwan distill recipes/toy_distill.yaml`` needs.

Both go through the same writer, schema and resumable output as ``fastwan preprocess``.
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
) -> dict[str, Any]:
    """Render ``num_clips`` training clips, encode them with the toy folder's pixel VAE
    and text encoder, write ``video`` shards to ``out_dir``; returns the summary."""
    from fastwan.data.encoders import WanVideoEncoder
    from fastwan.data.parquet_io import ResumableOutput
    from fastwan.data.preprocess import save_empty_prompt
    from fastwan.data.schema import video_row

    model_path = Path(model_path)
    text = _encoder(model_path)
    video = WanVideoEncoder.from_pretrained(model_path, device="cpu")
    items = training_items(num_clips, seed)
    settings = dict(
        world="toy", seed=seed, num_clips=num_clips, size=world.SIZE, frames=world.NUM_FRAMES
    )
    job = ResumableOutput(out_dir, "video", settings, rows_per_shard=rows_per_shard)
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
            frames = world.render_clip(combo, clip_seed)  # [T, H, W, 3] in [0, 1]
            latent = video(np.round(frames * 255).astype(np.uint8))  # [C, T, h, w]
            job.add(
                video_row(
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
) -> dict[str, Any]:
    """``num_prompts`` training-combination prompts as ``text`` shards (data-free DMD)."""
    from fastwan.data.preprocess import preprocess_prompts
    from fastwan.data.sources import PromptItem

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
