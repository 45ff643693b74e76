"""Which model a Diffusers folder holds, and how it samples: read from the folder's own files.

The folder is the truth (docs/architecture.md, decision "the folder is the truth"). Each
sampling setting is taken, highest first, from:

1. an explicit preset (``preset=`` / ``--preset``): the user's word for everything;
2. ``fastwan.json``, the sidecar fastwan writes on export (few-step timesteps, attention,
   VSA sparsity and tile, the size the student was trained at);
3. the files diffusers reads: ``model_index.json`` (``_class_name`` ``WanDMDPipeline`` marks
   FastVideo's few-step DMD releases; ``expand_timesteps``; ``boundary_ratio``),
   ``scheduler/scheduler_config.json`` (class and ``flow_shift`` / ``shift``),
   ``transformer/config.json`` (architecture, position table) and whether the weights carry
   VSA gates;
4. a known preset, matched by hub id, folder name (a hub-cache ``snapshots/<hash>`` folder is
   named by its ``models--org--name`` parent) or architecture: what no file says (negative
   prompt, default size / frames / fps, guidance scale and steps, FastWan's VSA sparsity);
5. diffusers' ``WanPipeline`` defaults.

Explicit ``generate()`` arguments come above all of these. Only JSON files are read here, so
sizes can be checked before any weight loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastwan.models.presets import FASTWAN_TIMESTEPS, PRESETS, WanPreset, get_preset
from fastwan.shapes import latent_grid

logger = logging.getLogger("fastwan")

SIDECAR_NAME = "fastwan.json"
SIDECAR_VERSION = 1
# FastVideo's marker of its few-step releases (its registry matches "wandmdpipeline").
DMD_PIPELINE_CLASSES = ("WanDMDPipeline",)
# The pipeline class diffusers loads Wan folders with; exports write it.
DIFFUSERS_PIPELINE_CLASS = "WanPipeline"
# diffusers' Wan2.1 image-to-video pipeline (CLIP image encoder, 36 input channels).
I2V_PIPELINE_CLASS = "WanImageToVideoPipeline"
# A gated checkpoint whose sparsity nothing records runs at FastWan2.1-1.3B's VSA sparsity.
FALLBACK_VSA_SPARSITY = 0.8
# diffusers WanPipeline.__call__ defaults (height, width, num_frames, steps, CFG, text
# length; negative_prompt None encodes ""); fps is diffusers' Wan examples' export fps.
_DIFFUSERS_DEFAULTS = dict(
    height=480,
    width=832,
    num_frames=81,
    fps=16,
    num_inference_steps=50,
    guidance_scale=5.0,
    negative_prompt="",
    text_length=512,
)
# Fields a known preset contributes when no file says them.
_PRESET_FIELDS = (
    "height",
    "width",
    "num_frames",
    "fps",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "text_length",
    "tile_size",
)
# Fields the sidecar may carry (what fastwan knows of a student it trained).
SIDECAR_FIELDS = (
    "timesteps",
    "num_inference_steps",
    "guidance_scale",
    "attention",
    "sparsity",
    "tile_size",
    "flow_shift",
    "height",
    "width",
    "num_frames",
    "fps",
    "text_length",
    "negative_prompt",
)
_HUB_CACHE_DIR = re.compile(r"^models--([^/]+?)--(.+)$")


@dataclass(frozen=True)
class ModelIdentity:
    """What a folder is: its effective defaults and where each came from."""

    preset: WanPreset  # the effective defaults (a known preset's name when one matched)
    sources: dict[str, str]  # sampling field -> its source, e.g. "scheduler_config.json"
    matched: str | None  # the known preset that filled the gaps, and how it was matched
    has_gates: bool
    rope_max_seq_len: int  # positions per axis of the transformer's rotary table
    patch_size: tuple[int, int, int]
    pipeline_class: str
    task: str = "t2v"  # fastwan.choices.TASKS: what the model generates from

    def describe(self) -> str:
        """One line per sampling setting: ``field = value  (source)``."""
        rows = []
        for name in sorted(self.sources):
            rows.append(f"  {name} = {getattr(self.preset, name)!r}  ({self.sources[name]})")
        return "\n".join(rows)


def read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``file`` or a ValueError naming the file and the fix."""
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{str(file)!r} does not exist; {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON ({err}); {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object; {what}")
    return data


def hub_name_of(path: Path) -> str | None:
    """``org/name`` of a hub-cache snapshot folder (``models--org--name/snapshots/<hash>``)."""
    parts = path.resolve().parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] == "snapshots" and i >= 2:
            match = _HUB_CACHE_DIR.match(parts[i - 2])
            if match:
                return f"{match.group(1)}/{match.group(2)}"
    return None


def _try_preset(name: str | None) -> WanPreset | None:
    if not name:
        return None
    try:
        return get_preset(name)
    except ValueError:
        return None


def _architecture(config: dict[str, Any]) -> tuple[int, int, int]:
    dim = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
    return dim, int(config.get("num_layers", 0)), int(config.get("in_channels", 0))


def match_preset(
    source: str | None,
    path: Path,
    transformer_config: dict[str, Any],
    *,
    few_step: bool,
    has_gates: bool,
    expand_timesteps: bool = False,
) -> tuple[WanPreset, str] | None:
    """The known preset of a folder and how it was matched: by the name the user gave, the
    folder's name, its hub-cache name, or its architecture (preferring, in this order, a
    preset with the folder's ``expand_timesteps`` (a TI2V folder, e.g. the toy image-to-video
    pair, shares its architecture with a text-to-video one), a few-step preset for a DMD
    folder and a VSA preset for a gated one); None when nothing matches."""
    for name, how in (
        (source, "the name given"),
        (path.name, "the folder name"),
        (hub_name_of(path), "the hub cache name"),
    ):
        preset = _try_preset(name)
        if preset is not None:
            return preset, how
    arch = _architecture(transformer_config)
    candidates = [p for p in PRESETS.values() if (p.dim, p.num_layers, p.in_channels) == arch]
    if not candidates:
        return None

    def rank(p: WanPreset) -> tuple[bool, bool, bool, bool]:
        return (
            p.expand_timesteps != expand_timesteps,
            p.few_step != few_step,
            (p.attention == "vsa") != has_gates,
            p.bundled,
        )

    return min(candidates, key=rank), "its architecture"


def read_sidecar(path: Path) -> dict[str, Any]:
    """The checked contents of ``fastwan.json`` (empty when the folder has none)."""
    file = path / SIDECAR_NAME
    if not file.is_file():
        return {}
    fix = "delete it to sample with the folder's other files, or re-export the model"
    data = read_json(file, fix)
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object; {fix}")
    extra = sorted(set(data) - {"format_version", "sampling"})
    if extra:  # e.g. a hand-edited "timesteps" beside "sampling" would be silently ignored
        raise ValueError(
            f"{str(file)!r}: unknown top-level keys {extra} (only 'format_version' and "
            f"'sampling'; sampling settings go inside 'sampling'); {fix}"
        )
    version = data.get("format_version")
    if version != SIDECAR_VERSION:
        raise ValueError(
            f"{str(file)!r} has format_version {version!r}; this fastwan reads version "
            f"{SIDECAR_VERSION}: {fix}"
        )
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise ValueError(f"{str(file)!r}: 'sampling' must be an object; {fix}")
    unknown = sorted(set(sampling) - set(SIDECAR_FIELDS))
    if unknown:
        raise ValueError(f"{str(file)!r}: unknown sampling fields {unknown}; {fix}")
    out = dict(sampling)
    for key in ("timesteps", "tile_size"):
        if out.get(key) is not None:
            out[key] = tuple(out[key])
    return out


def task_of(model_index: dict[str, Any], transformer_config: dict[str, Any]) -> str:
    """``i2v`` for a Wan2.1 image-to-video folder (its pipeline class, an image encoder, or
    a transformer with image cross-attention), ``ti2v`` for Wan2.2's per-token timesteps,
    else ``t2v``."""
    if (
        model_index.get("_class_name") == I2V_PIPELINE_CLASS
        or model_index.get("image_encoder") not in (None, [None, None])
        or transformer_config.get("image_dim") is not None
    ):
        return "i2v"
    return "ti2v" if model_index.get("expand_timesteps") else "t2v"


def scheduler_shift(scheduler_config: dict[str, Any]) -> float | None:
    """The flow shift a scheduler config states (UniPC ``flow_shift``, FlowMatchEuler
    ``shift``), or None."""
    for key in ("flow_shift", "shift"):
        value = scheduler_config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def identify(
    path: str | Path,
    *,
    has_gates: bool,
    source: str | None = None,
    preset: str | WanPreset | None = None,
) -> ModelIdentity:
    """The identity of the pipeline folder ``path`` (see the module docstring for the order
    of sources). ``source``: the name the user passed (hub id or preset name), used to
    match a preset when the folder's own name says nothing (a hub snapshot's hash)."""
    path = Path(path)
    index = read_json(path / "model_index.json", "pass a Diffusers-format Wan pipeline folder")
    tconfig = read_json(
        path / "transformer" / "config.json", "the pipeline needs a transformer/ folder"
    )
    sconfig = read_json(
        path / "scheduler" / "scheduler_config.json", "the pipeline needs a scheduler/ folder"
    )
    vae_file = path / "vae" / "config.json"
    vconfig = read_json(vae_file, "the pipeline needs a vae/ folder")
    pipeline_class = str(index.get("_class_name", DIFFUSERS_PIPELINE_CLASS))
    if index.get("boundary_ratio") is not None and index.get("transformer_2") not in (
        None,
        [None, None],
    ):
        raise ValueError(
            f"{str(path)!r} is a two-expert Wan2.2 model (boundary_ratio "
            f"{index['boundary_ratio']} with transformer_2); fastwan runs one transformer: "
            "use diffusers' WanPipeline for it"
        )
    dmd = pipeline_class in DMD_PIPELINE_CLASSES
    sidecar = read_sidecar(path)
    few_step_hint = dmd or sidecar.get("timesteps") is not None

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(name: str, value: Any, where: str) -> None:
        values[name] = value
        sources[name] = where

    # 5. diffusers' defaults
    for name, value in _DIFFUSERS_DEFAULTS.items():
        put(name, value, "diffusers WanPipeline default")
    put("timesteps", None, "diffusers WanPipeline default")
    put("attention", "dense", "diffusers WanPipeline default")
    put("sparsity", 0.0, "diffusers WanPipeline default")
    put("tile_size", (4, 4, 4), "fastwan default (VSA tile 4x4x4)")
    # 4. a known preset
    explicit = preset if isinstance(preset, WanPreset) else _try_preset(preset)
    if preset is not None and explicit is None:
        get_preset(preset)  # raises the "unknown preset" error
    found = (explicit, "given") if explicit is not None else None
    if found is None:
        found = match_preset(
            source,
            path,
            tconfig,
            few_step=few_step_hint,
            has_gates=has_gates,
            expand_timesteps=bool(index.get("expand_timesteps", False)),
        )
    matched = None
    base = None
    if found is not None:
        base, how = found
        matched = f"{base.name} (matched by {how})"
        where = f"preset {base.name}"
        for name in _PRESET_FIELDS:
            put(name, getattr(base, name), where)
        if base.attention == "vsa":
            put("sparsity", base.sparsity, where)
        if base.few_step:
            put("timesteps", base.timesteps, where)
        put("flow_shift", base.flow_shift, where)
    # 3. the folder's files
    if dmd:
        put("timesteps", tuple(FASTWAN_TIMESTEPS), f"model_index.json ({pipeline_class})")
        put("guidance_scale", 1.0, f"model_index.json ({pipeline_class}: no CFG)")
    elif base is not None and base.few_step and explicit is None:
        # The files say multi-step (a WanPipeline folder) though the name matched FastWan.
        put("timesteps", None, f"model_index.json ({pipeline_class})")
        put("guidance_scale", _DIFFUSERS_DEFAULTS["guidance_scale"], "diffusers default")
    shift = scheduler_shift(sconfig)
    if shift is not None:
        put("flow_shift", shift, "scheduler_config.json")
    elif "flow_shift" not in values:
        put("flow_shift", 1.0, "diffusers default (no shift in scheduler_config.json)")
    put("expand_timesteps", bool(index.get("expand_timesteps", False)), "model_index.json")
    if has_gates:
        put("attention", "vsa", "transformer weights (VSA gates present)")
        if not (base is not None and base.attention == "vsa"):
            put("sparsity", FALLBACK_VSA_SPARSITY, "fastwan default for a gated checkpoint")
    else:
        put("attention", "dense", "transformer weights (no VSA gates)")
    # 2. fastwan's sidecar
    for name, value in sidecar.items():
        put(name, value, SIDECAR_NAME)
    # 1. an explicit preset: the user's word for every sampling setting
    if explicit is not None:
        where = f"preset {explicit.name} (given)"
        for name in (*_PRESET_FIELDS, "timesteps", "attention", "sparsity", "flow_shift"):
            put(name, getattr(explicit, name), where)
        put("expand_timesteps", explicit.expand_timesteps or values["expand_timesteps"], where)

    dim, num_layers, in_channels = _architecture(tconfig)
    st = int(vconfig.get("scale_factor_temporal", 4))
    ss = int(vconfig.get("scale_factor_spatial", 8))
    arch = dict(
        dim=dim,
        num_layers=num_layers,
        in_channels=in_channels,
        num_heads=int(tconfig.get("num_attention_heads", 0)),
        ffn_dim=int(tconfig.get("ffn_dim", 0)),
        vae_stride=(st, ss, ss),
    )
    name = base.name if base is not None else path.name or "wan"
    fields = {f.name for f in dataclasses.fields(WanPreset)}
    task = task_of(index, tconfig)  # the folder's files, not a matched preset's default
    effective = WanPreset(
        name=name,
        hub_id=base.hub_id if base is not None else "",
        bundled=base.bundled if base is not None else False,
        aliases=base.aliases if base is not None else (),
        **arch,
        task=task,
        **{k: v for k, v in values.items() if k in fields},
    )
    patch = tuple(int(x) for x in tconfig.get("patch_size", (1, 2, 2)))
    identity = ModelIdentity(
        preset=effective,
        sources=dict(sorted(sources.items())),
        matched=matched,
        has_gates=has_gates,
        rope_max_seq_len=int(tconfig.get("rope_max_seq_len", 1024)),
        patch_size=patch,  # type: ignore[arg-type]
        pipeline_class=pipeline_class,
        task=task,
    )
    logger.info(
        "%s: %s; sampling settings and their sources:\n%s",
        path,
        f"preset {matched}" if matched else "no known preset (diffusers defaults)",
        identity.describe(),
    )
    return identity


def identity_of_modules(
    transformer_config: dict[str, Any],
    vae_config: dict[str, Any],
    *,
    name: str = "model",
    expand_timesteps: bool = False,
    **sampling: Any,
) -> ModelIdentity:
    """The identity of networks already in memory (training's validation): their sizes
    from the transformer's and VAE's configs, diffusers' defaults for sampling, replaced by
    ``sampling`` (any :class:`WanPreset` sampling field, e.g. ``flow_shift``)."""
    fields = {f.name for f in dataclasses.fields(WanPreset)}
    unknown = sorted(set(sampling) - fields)
    if unknown:
        raise ValueError(f"unknown sampling fields {unknown}; known: {sorted(fields)}")
    tconfig, vconfig = dict(transformer_config), dict(vae_config)
    dim, num_layers, in_channels = _architecture(tconfig)
    st = int(vconfig.get("scale_factor_temporal", 4))
    ss = int(vconfig.get("scale_factor_spatial", 8))
    values: dict[str, Any] = dict(_DIFFUSERS_DEFAULTS, flow_shift=1.0)
    values.update(sampling)
    values["expand_timesteps"] = bool(expand_timesteps)
    index = {"expand_timesteps": bool(expand_timesteps)}
    task = task_of(index, tconfig)
    preset = WanPreset(
        name=name,
        hub_id="",
        dim=dim,
        num_layers=num_layers,
        in_channels=in_channels,
        num_heads=int(tconfig.get("num_attention_heads", 0)),
        ffn_dim=int(tconfig.get("ffn_dim", 0)),
        vae_stride=(st, ss, ss),
        task=task,
        **{k: v for k, v in values.items() if k in fields},
    )
    return ModelIdentity(
        preset=preset,
        sources={k: "argument" for k in sampling},
        matched=None,
        has_gates=False,
        rope_max_seq_len=int(tconfig.get("rope_max_seq_len", 1024)),
        patch_size=tuple(int(x) for x in tconfig.get("patch_size", (1, 2, 2))),  # type: ignore[arg-type]
        pipeline_class=DIFFUSERS_PIPELINE_CLASS,
        task=task,
    )


# Bound on latent tokens per video: ~40x Wan2.2-5B's 720P x 121 frames (109k tokens); past
# it a request is a typo (e.g. --num-frames 1000000), not a video any device can hold.
MAX_LATENT_TOKENS = 1 << 22


def check_video_size(
    identity: ModelIdentity, height: Any, width: Any, num_frames: Any
) -> tuple[int, int, int]:
    """Refuse a size the model cannot take, before anything loads: positive ints, multiples
    of the VAE stride x patch, within the rotary position table and a sane token count.
    Returns the latent grid ``(T, H, W)`` (:func:`fastwan.shapes.latent_grid`)."""
    p = identity.preset
    st, sh, sw = p.vae_stride
    pt, ph, pw = identity.patch_size
    latent = latent_grid(num_frames, height, width, p.vae_stride, identity.patch_size)
    limit = identity.rope_max_seq_len
    grid = latent[0] // pt, latent[1] // ph, latent[2] // pw  # tokens per axis
    largest = {  # the largest value of each size whose token count fits the rotary table
        "num_frames": (limit * pt - 1) * st + 1,
        "height": limit * sh * ph,
        "width": limit * sw * pw,
    }
    sizes = {"num_frames": num_frames, "height": height, "width": width}
    for name, tokens in zip(("num_frames", "height", "width"), grid):
        if tokens > limit:
            raise ValueError(
                f"{name}={sizes[name]} needs {tokens} positions, past the model's rotary table "
                f"of {limit} (transformer config rope_max_seq_len); the largest {name} it "
                f"takes: {largest[name]}"
            )
    total = math.prod(grid)
    if total > MAX_LATENT_TOKENS:
        raise ValueError(
            f"{height}x{width} at {num_frames} frames is {total} latent tokens, past the "
            f"sanity bound of {MAX_LATENT_TOKENS}; pass a smaller height, width or num_frames"
        )
    return latent
