"""Exporting Wan transformers (with their VSA gates) in the Diffusers layout.

The saved folder is what diffusers writes (``config.json`` + safetensors): fastwan reloads
it bit-exactly, gates included; stock diffusers loads the same folder and sees the gate
keys (``blocks.N.to_gate_compress.*``) as the only extra weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from fastwan.models.loading import COMPONENTS, read_model_index


def save_transformer(
    transformer: nn.Module, out_dir: str | Path, *, max_shard_size: str | int = "10GB"
) -> Path:
    """Save a Wan transformer (gates included) as ``out_dir/config.json`` + safetensors."""
    if not hasattr(transformer, "save_pretrained"):
        raise ValueError(
            f"expected a diffusers WanTransformer3DModel, got {type(transformer).__name__}; "
            "unwrap it first (e.g. the module inside a DDP/compile wrapper)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(
        str(out_dir), safe_serialization=True, max_shard_size=max_shard_size
    )
    return out_dir


def export_pipeline(
    source: str | Path, transformer: nn.Module, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Write a complete Diffusers pipeline folder: ``transformer`` saved by fastwan, the
    other components (vae, text encoder, tokenizer, scheduler) copied from ``source``."""
    source, out_dir = Path(source), Path(out_dir)
    index = read_model_index(source)
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
    for name in COMPONENTS:
        if name != "transformer":
            shutil.copytree(source / name, out_dir / name)
    extra = [k for k, v in index.items() if isinstance(v, list) and k not in COMPONENTS]
    for name in extra:  # optional components (e.g. transformer_2) are not exported
        index[name] = [None, None]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_transformer(transformer, out_dir / "transformer")
    return out_dir
