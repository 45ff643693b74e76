"""The arguments of ``VideoGenerator.generate`` that a user sets, and their checks before
any weight loads: one home for ``fastwan generate`` (flags), ``fastwan serve`` (request
fields) and the multi-device generator (its parent process holds no weights).

* :data:`USER_ARGUMENTS` and :func:`generate_kwargs`: the keyword arguments a user may set
  (a CLI flag or a request field each), built in one place;
* :func:`input_checker`: a ``VideoGenerator`` of a folder without its weights (the
  transformer on the meta device, the VAE as its geometry), whose ``check_inputs`` is the
  loaded model's own check: sizes, frames, image-or-not for the model's task, image
  decoding, sampler and steps, seed. Checking with it before a load gives the errors a
  load would end in, in a fraction of a second.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastwan.pipeline import VideoGenerator

# generate() arguments a user sets (a flag of `fastwan generate`, a field of `fastwan serve`);
# the rest (latents, embeddings, callbacks, output_type) are for code.
USER_ARGUMENTS = (
    "prompt",
    "negative_prompt",
    "image",
    "last_image",
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "timesteps",
    "guidance_scale",
    "seed",
    "sampler",
    "flow_shift",
    "max_sequence_length",
)


def generate_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """``VideoGenerator.generate`` keyword arguments from a user's ``values`` (a name of
    :data:`USER_ARGUMENTS` each; one left out or None: the model's default). A name outside
    the list is a ValueError: a user setting never silently does nothing."""
    unknown = sorted(set(values) - set(USER_ARGUMENTS))
    if unknown:
        raise ValueError(
            f"{unknown[0]} is not a generate() argument a user sets; they are "
            f"{', '.join(USER_ARGUMENTS)}"
        )
    return {name: values.get(name, 0 if name == "seed" else None) for name in USER_ARGUMENTS}


def _vae_geometry(temporal: int, spatial: int, z_dim: int) -> Any:
    """A VAE's strides and latent channels without the VAE: what ``check_inputs`` reads
    (``vae.config``), on a module without parameters (nothing to move or to hold)."""
    import torch

    module = torch.nn.Module()
    module.config = SimpleNamespace(
        scale_factor_temporal=temporal, scale_factor_spatial=spatial, z_dim=z_dim
    )
    return module


def _build_checker(path: str, preset: Any, strict: bool) -> VideoGenerator:
    import torch

    from fastwan.models.loading import (
        WanComponents,
        identify_folder,
        load_transformer,
        read_model_index,
    )
    from fastwan.pipeline import VideoGenerator

    folder, identity = identify_folder(path, preset=preset)
    # The weight files' names and shapes are checked; no weight is read.
    transformer = load_transformer(folder, device="meta", strict=strict)
    st, ss, _ = identity.preset.vae_stride  # the VAE config's, with diffusers' defaults
    vae_config = json.loads((Path(folder) / "vae" / "config.json").read_text())
    # The transformer predicts the VAE's latents: its out_channels are the VAE's z_dim.
    out = transformer.config.get("out_channels") or transformer.config["in_channels"]
    z_dim = int(vae_config.get("z_dim") or out)
    components = WanComponents(
        path=Path(folder),
        model_index=read_model_index(folder),
        identity=identity,
        transformer=transformer,
        vae=_vae_geometry(st, ss, z_dim),
        text_encoder=None,
        tokenizer=None,
        scheduler=None,
    )
    return VideoGenerator(components, device=torch.device("meta"))


def input_checker(
    path_or_id: str | Path, *, preset: Any = None, strict: bool = False
) -> VideoGenerator:
    """A ``VideoGenerator`` of ``path_or_id`` without weights, for ``check_inputs``,
    ``preset``, ``task`` and the geometry (``latent_shape``, ``default_size_for_image``);
    it cannot generate. Cached per (folder, preset name, strict); ``preset``: a name or a
    ``WanPreset``, as ``from_pretrained`` takes it."""
    if preset is None or isinstance(preset, str):
        return _cached_checker(str(path_or_id), preset, bool(strict))
    return _build_checker(str(path_or_id), preset, bool(strict))


_cached_checker = functools.lru_cache(maxsize=8)(_build_checker)
