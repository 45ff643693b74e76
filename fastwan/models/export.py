"""Exporting Wan transformers (with their VSA gates) in the Diffusers layout.

The saved folder is what diffusers writes (``config.json`` + safetensors) under a
``model_index.json`` that plain ``DiffusionPipeline.from_pretrained`` loads (``WanPipeline``;
the gate keys ``blocks.N.to_gate_compress.*`` show there as unused weights). How the student
samples (few-step timesteps, attention, VSA sparsity and tile, its training size) is recorded
in the ``fastwan.json`` sidecar, which diffusers ignores and fastwan reads first
(:mod:`fastwan.models.identity`), so fastwan reloads the folder exactly as it was trained.
No exported config keeps a local path (``_name_or_path``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastwan.models.identity import (
    DIFFUSERS_PIPELINE_CLASS,
    DMD_PIPELINE_CLASSES,
    SIDECAR_FIELDS,
    SIDECAR_NAME,
    SIDECAR_VERSION,
)
from fastwan.models.loading import COMPONENTS, IMAGE_COMPONENTS, read_model_index
from fastwan.models.presets import FASTWAN_TIMESTEPS
from fastwan.models.vsa import GATE_NAME

_LOCAL_KEYS = ("_name_or_path",)  # config keys that record where a model was loaded from


def strip_local_paths(folder: str | Path) -> None:
    """Remove ``_name_or_path`` from every ``config.json`` under ``folder``."""
    for file in Path(folder).rglob("*config*.json"):
        data = json.loads(file.read_text())
        if isinstance(data, dict) and any(k in data for k in _LOCAL_KEYS):
            for key in _LOCAL_KEYS:
                data.pop(key, None)
            file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def gates_are_zero(transformer: nn.Module) -> bool:
    """True when the transformer has no VSA gate or only untrained (all-zero) ones."""
    for block in getattr(transformer, "blocks", []):
        gate = getattr(block, GATE_NAME, None)
        if gate is not None and any(p.detach().ne(0).any() for p in gate.parameters()):
            return False
    return True


@contextmanager
def _without_gates(transformer: nn.Module) -> Iterator[None]:
    """Detach the gate modules for the duration (a dense model saves no gate tensors)."""
    removed = {}
    for i, block in enumerate(getattr(transformer, "blocks", [])):
        if getattr(block, GATE_NAME, None) is not None:
            removed[i] = getattr(block, GATE_NAME)
            delattr(block, GATE_NAME)
    try:
        yield
    finally:
        for i, gate in removed.items():
            transformer.blocks[i].add_module(GATE_NAME, gate)


def save_transformer(
    transformer: nn.Module,
    out_dir: str | Path,
    *,
    max_shard_size: str | int = "10GB",
    gates: bool | None = None,
) -> Path:
    """Save a Wan transformer as ``out_dir/config.json`` + safetensors (sharded with an
    index past ``max_shard_size``). ``gates``: save the VSA gates (default: unless they
    are all zero, which is exactly the model without them)."""
    if not hasattr(transformer, "save_pretrained"):
        raise ValueError(
            f"expected a diffusers WanTransformer3DModel, got {type(transformer).__name__}; "
            "unwrap it first (e.g. the module inside a DDP/compile wrapper)"
        )
    if gates is None:
        gates = not gates_are_zero(transformer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if gates:
        transformer.save_pretrained(
            str(out_dir), safe_serialization=True, max_shard_size=max_shard_size
        )
    else:
        with _without_gates(transformer):
            transformer.save_pretrained(
                str(out_dir), safe_serialization=True, max_shard_size=max_shard_size
            )
    strip_local_paths(out_dir)
    return out_dir


def _check_sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(sampling) - set(SIDECAR_FIELDS))
    if unknown:
        raise ValueError(f"sampling: unknown fields {unknown}; valid: {list(SIDECAR_FIELDS)}")
    out = {}
    for key, value in sampling.items():
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def export_pipeline(
    source: str | Path,
    transformer: nn.Module,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    sampling: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete Diffusers pipeline folder: ``transformer`` saved by fastwan, the
    other components (vae, text encoder, tokenizer, scheduler, and an image-to-video
    model's image encoder and processor) copied from ``source``; the pipeline class stays
    (``WanImageToVideoPipeline`` for Wan2.1 I2V).

    sampling: how the model is meant to sample (fields of
    :data:`fastwan.models.identity.SIDECAR_FIELDS`, e.g. ``timesteps``, ``attention``,
    ``sparsity``, ``tile_size``), written to the ``fastwan.json`` sidecar.
    """
    source, out_dir = Path(source), Path(out_dir)
    index = read_model_index(source)
    record = _check_sampling(sampling or {})
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"output folder {str(out_dir)!r} is not empty; pick a new folder or pass "
                "overwrite=True"
            )
        if out_dir.resolve() == source.resolve():
            raise ValueError("out_dir must differ from the source pipeline folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = [*COMPONENTS, *IMAGE_COMPONENTS]
    for name in kept:  # Wan2.1 I2V's CLIP encoder and processor travel with the model
        if name != "transformer" and index.get(name) not in (None, [None, None]):
            shutil.copytree(source / name, out_dir / name)
    extra = [k for k, v in index.items() if isinstance(v, list) and k not in kept]
    for name in extra:  # other optional components (e.g. transformer_2) are not exported
        index[name] = [None, None]
    if index.get("_class_name") in DMD_PIPELINE_CLASSES:
        # FastVideo's class is not in diffusers; the sidecar keeps the few-step sampling.
        index["_class_name"] = DIFFUSERS_PIPELINE_CLASS
        record.setdefault("timesteps", list(FASTWAN_TIMESTEPS))
        record.setdefault("guidance_scale", 1.0)
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_transformer(transformer, out_dir / "transformer")
    strip_local_paths(out_dir)
    sidecar = {"format_version": SIDECAR_VERSION, "sampling": record}
    (out_dir / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out_dir
