"""Synthetic datasets: a teacher generates the latents of each prompt, written in the same
schema as preprocessed videos (DMD2 / FastWan distil on teacher samples).

The core takes callables, so any teacher (or a test double) serves:

* ``generate(prompt, seed)``: the teacher's sample for ``prompt`` from a generator seeded
  with ``seed`` (multi-step, dense attention, CFG), as an *unnormalised* latent
  ``[C, T, H, W]`` (the VAE's space: what ``vae.decode`` takes, what preprocessing stores);
* ``encode_text(prompts)``: one ``[L_i, dim]`` embedding per prompt (valid tokens only).

Each prompt yields ``samples_per_prompt`` rows, with ids ``<prompt id>/s<k>`` and seeds
:func:`sample_seed` (distinct per prompt and sample, the same on every run and rank). The
caption is the prompt; ``generation_settings`` records the teacher, sampler, steps,
guidance, negative prompt, shift and seed. Under ``world_size`` ranks (torchrun), rank
``r`` takes every ``world_size``-th sample; the output is resumable.
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
    EncodeText,
    _as_embeddings,
    _as_latent,
    save_empty_prompt,
)
from fastwan.data.schema import video_row
from fastwan.data.sources import PromptItem

__all__ = ["GenerateLatent", "REQUIRED_SETTINGS", "sample_seed", "synthesize"]

GenerateLatent = Callable[[str, int], torch.Tensor]  # (prompt, seed) -> [C, T, H, W]

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
) -> dict[str, Any]:
    """Generate and write ``samples_per_prompt`` teacher samples per prompt; return the
    summary (also in ``out_dir/summary.json`` or ``summary-rankNNN.json``)."""
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"settings must give {list(REQUIRED_SETTINGS)}; missing {missing}")
    for name, value in (("samples_per_prompt", samples_per_prompt), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if samples_per_prompt < 1:
        raise ValueError("samples_per_prompt must be >= 1")
    recorded = dict(settings, seed=seed, samples_per_prompt=samples_per_prompt)
    job = ResumableOutput(
        out_dir,
        "video",
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
    try:
        save_empty_prompt(job, encode_text)
        bar = tqdm(pending, desc="synthesize", unit="video", disable=not progress, file=sys.stderr)
        for item, k in bar:
            row_id = f"{item.id}/s{k}"
            s = sample_seed(seed, item.id, k)
            latent = _as_latent(generate(item.prompt, s), row_id)  # [C, T, H, W]
            if item.id not in cache:
                cache.clear()
                (cache[item.id],) = _as_embeddings(encode_text([item.prompt]), 1, row_id)
            job.add(
                video_row(
                    id=row_id,
                    latent=latent,
                    text_embedding=cache[item.id],  # [L, dim]
                    caption=item.prompt,
                    file_name=row_id,
                    width=settings["width"],
                    height=settings["height"],
                    num_frames=settings["num_frames"],
                    fps=settings["fps"],
                    generation_settings=json.dumps(dict(per_row, seed=s, sample=k)),
                )
            )
        complete = True
    finally:
        summary = job.finish(
            total_items=len(mine), complete=complete, inputs_already_done=len(mine) - len(pending)
        )
    return summary
