"""Wan models on diffusers / transformers: loading Diffusers folders, presets, the VSA gate
and self-attention processor, and export. diffusers is imported only when used."""

from fastwan.models.compile import compile_blocks, parse_compile
from fastwan.models.export import export_pipeline, save_transformer
from fastwan.models.loading import (
    COMPONENTS,
    WanComponents,
    load_components,
    load_gate_weights,
    load_scheduler,
    load_transformer,
    read_gate_tensors,
    read_model_index,
    resolve_model_path,
)
from fastwan.models.presets import (
    PRESETS,
    WanPreset,
    get_preset,
    infer_preset,
    transformer_config,
)
from fastwan.models.vsa import (
    GATE_NAME,
    WanVSAAttnProcessor,
    add_vsa_gates,
    get_attention,
    has_vsa_gates,
    set_attention,
)

__all__ = [
    "COMPONENTS",
    "GATE_NAME",
    "PRESETS",
    "WanComponents",
    "WanPreset",
    "WanVSAAttnProcessor",
    "add_vsa_gates",
    "compile_blocks",
    "export_pipeline",
    "get_attention",
    "get_preset",
    "has_vsa_gates",
    "infer_preset",
    "load_components",
    "load_gate_weights",
    "load_scheduler",
    "load_transformer",
    "parse_compile",
    "read_gate_tensors",
    "read_model_index",
    "resolve_model_path",
    "save_transformer",
    "set_attention",
    "transformer_config",
]
