"""``fastwan export`` of a LoRA run (``lora.rank > 0``): the generator's adapter as a
diffusers-format Wan LoRA folder, or merged into its base as a Diffusers pipeline folder.

The generator's base is rebuilt from the model folder the run trained from (the teacher,
or ``model.student`` with ``lora.shared_base: false``), its adapter -- and its VSA gates --
are read from the checkpoint (saved by any number of processes; the EMA with ``ema``), then

* default: :func:`fastwan.models.lora.save_lora` -- ``pytorch_lora_weights.safetensors``
  (``WanPipeline.load_lora_weights`` loads it), ``vsa_gates.safetensors`` (full gate
  tensors, gate adapters folded in; a dense student has none) and ``fastwan_lora.json``
  (rank, alpha, targets, the base model, how the student samples);
* ``merge``: the adapter folded into the base weights (:func:`fastwan.models.lora.merge_lora`)
  and written as a Diffusers folder with its gates and ``fastwan.json``, like the export of a
  full run.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fastwan.config import Recipe
from fastwan.train.checkpoint import check_checkpoint, load_network_weights

__all__ = ["LORA_EXPORT_FORMAT", "export_lora", "generator_base"]

LORA_EXPORT_FORMAT = "fastwan-lora"


def generator_base(recipe: Recipe) -> str:
    """The model the generator's adapter sits on: the teacher, or ``model.student`` when it
    has a base of its own (``lora.shared_base: false``)."""
    m = recipe.model
    if recipe.train.method == "dmd" and (recipe.lora.shared_base or m.student is None):
        return m.teacher
    return m.student_path


def _shown_model(name: str) -> str:
    """A hub id as it is; a local folder by its name only (no exported file keeps a local
    path)."""
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


def _fresh_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"output folder {str(out_dir)!r} is not empty; pick a new folder or pass "
                "--overwrite"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def export_lora(
    checkpoint: str | Path,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    model: str | None = None,
    ema: bool = False,
    merge: bool = False,
    overwrite: bool = False,
    sampling: Mapping[str, Any] | None = None,
) -> Path:
    """Export the generator adapter of the LoRA checkpoint ``checkpoint`` (trained with
    ``recipe``) to ``out_dir`` (see the module docstring); ``model``: the base's folder
    (default: the recipe's); ``sampling``: how the student samples (``fastwan.json`` /
    ``fastwan_lora.json``). Returns ``out_dir``."""
    from fastwan.methods.adapters import attach_adapter, role_parameters
    from fastwan.models.export import export_pipeline
    from fastwan.models.loading import load_transformer, resolve_model_path
    from fastwan.models.lora import merge_lora, save_lora

    if not recipe.lora.enabled:
        raise ValueError(
            f"{str(checkpoint)!r} was trained without LoRA (lora.rank 0); export it without "
            "--merge-lora"
        )
    marker = check_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    base = model if model is not None else generator_base(recipe)
    base_path = resolve_model_path(base)
    transformer = load_transformer(base_path, dtype=torch.float32)
    attach_adapter(
        transformer,
        "generator",
        recipe.lora,
        vsa_enabled=recipe.vsa.enabled,
        dtype=torch.float32,
        seed=recipe.train.seed,
    )
    names = role_parameters(transformer, "generator", recipe.lora, vsa_enabled=recipe.vsa.enabled)
    for name, p in transformer.named_parameters():  # the EMA holds exactly these
        p.requires_grad_(name in names)
    load_network_weights(checkpoint, "generator", transformer, names=set(names))
    if ema:
        load_network_weights(checkpoint, "generator", transformer, ema=True)
    transformer.requires_grad_(False)
    if merge:
        merge_lora(transformer, "generator")
        teacher = resolve_model_path(model if model is not None else recipe.model.teacher)
        return export_pipeline(
            teacher, transformer, out_dir, overwrite=overwrite, sampling=dict(sampling or {})
        )
    _fresh_dir(out_dir, overwrite)
    lora = recipe.lora
    info = {
        "format": LORA_EXPORT_FORMAT,
        "version": 1,
        "base_model": _shown_model(base),
        "rank": lora.rank,
        "alpha": lora.scale_alpha,
        "target_modules": list(lora.target_modules),
        "gates": lora.gates if recipe.vsa.enabled else None,
        "step": int(marker.get("step", 0)),
        "ema": bool(ema),
        "sampling": dict(sampling or {}),
    }
    return save_lora(transformer, out_dir, "generator", gates=recipe.vsa.enabled, info=info)
