"""Loading Wan pipelines from Diffusers-format folders (local, or the hub where reachable).

A folder holds ``model_index.json`` and the components ``transformer/`` (diffusers'
``WanTransformer3DModel``), ``vae/`` (``AutoencoderKLWan``), ``text_encoder/`` (transformers'
``UMT5EncoderModel``), ``tokenizer/`` and ``scheduler/``. The transformer may carry VSA gates
(``blocks.N.to_gate_compress.*``, FastWan's layout); diffusers ignores those keys, fastwan
loads them into the gates it adds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastwan.models.identity import ModelIdentity, identify
from fastwan.models.presets import PRESETS, WanPreset, get_preset
from fastwan.models.vsa import GATE_NAME, add_vsa_gates, set_attention

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_GATE_KEY = re.compile(rf"^blocks\.(\d+)\.{GATE_NAME}\.(weight|bias)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path_or_id: str | Path) -> Path:
    """A local Diffusers folder as is; a preset name or hub repo id downloaded through
    ``huggingface_hub`` (a clear error when there is no network)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {str(path)!r} is a file; pass the pipeline folder")
        return path
    name = str(path_or_id)
    try:
        preset = get_preset(name)
    except ValueError:
        preset = None
    if preset is not None and preset.bundled:  # the toy world's weights ship with fastwan
        from fastwan.toy.assets import toy_model_path

        return toy_model_path(preset.name)
    if preset is not None:
        repo_id = preset.hub_id
    else:
        repo_id = name if _REPO_ID.match(name) and not name.startswith(".") else None
    if repo_id is None:
        raise ValueError(
            f"model folder {name!r} does not exist; pass a local Diffusers-format Wan folder "
            f"(with model_index.json), a hub repo id, or a preset name from {sorted(PRESETS)}"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as err:  # offline, unknown repo, no permission: all need a local path
        raise ValueError(
            f"could not download {repo_id!r} from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Without a "
            f"network, fetch it elsewhere (e.g. `hf download {repo_id} --local-dir DIR`), copy "
            "DIR here and pass its local path instead (--model DIR)"
        ) from err


def read_model_index(path: str | Path) -> dict[str, Any]:
    """``model_index.json`` of a pipeline folder, checked for the components fastwan needs."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"{str(path)!r} has no model_index.json: pass the root of a Diffusers-format Wan "
            "pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
            "scheduler/)"
        )
    index = json.loads(index_file.read_text())
    for name in COMPONENTS:
        if index.get(name) in (None, [None, None]) or not (path / name).is_dir():
            raise ValueError(
                f"{str(path)!r} is missing the {name!r} component (folder {name}/ and its "
                f"model_index.json entry); fastwan needs {list(COMPONENTS)}"
            )
    return index


def _transformer_dir(path: Path) -> Path:
    """Accept the pipeline folder or its transformer/ subfolder."""
    if (path / "model_index.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{str(path)!r} holds no transformer (config.json missing); pass a pipeline folder "
            "or its transformer/ subfolder"
        )
    return path


def _weight_files(transformer_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for single-file and sharded checkpoints."""
    index = transformer_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: transformer_dir / f for k, f in weight_map.items()}
    single = transformer_dir / WEIGHTS_NAME
    if not single.is_file():
        raise ValueError(
            f"{str(transformer_dir)!r} has no {WEIGHTS_NAME} (or sharded index); fastwan loads "
            "safetensors weights only"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


@dataclass(frozen=True)
class GateReport:
    """Which blocks of a checkpoint carry a complete VSA gate (weight and bias)."""

    complete: tuple[int, ...]  # blocks with both gate tensors
    partial: dict[int, tuple[str, ...]]  # block -> the gate tensors it lacks
    absent: tuple[int, ...]  # blocks with no gate tensor, in a checkpoint that has some
    misnamed: tuple[str, ...]  # keys that look like gates but are not blocks.N.<gate>.*

    @property
    def has_gates(self) -> bool:
        return bool(self.complete)

    @property
    def incomplete(self) -> bool:
        return bool(self.partial or self.absent or self.misnamed)

    def problem(self, where: str) -> str:
        parts = []
        if self.absent:
            parts.append(f"blocks {list(self.absent)} have no gate")
        for n, lacks in sorted(self.partial.items()):
            parts.append(f"block {n} lacks {', '.join(lacks)}")
        if self.misnamed:
            parts.append(
                f"{list(self.misnamed)[:4]} are not named blocks.N.{GATE_NAME}.(weight|bias)"
            )
        return (
            f"the VSA gates in {where} are incomplete: {'; '.join(parts)}. Those blocks keep a "
            "zero gate, so VSA's coarse branch is off in them and the model does not run as "
            "it was trained; re-export the checkpoint with all gates, or pass strict=False "
            "(--no-strict) to run it anyway"
        )


def gate_report(keys, num_layers: int) -> GateReport:
    """Classify the gate keys among a checkpoint's tensor names."""
    found: dict[int, set[str]] = {}
    misnamed = []
    for key in keys:
        match = _GATE_KEY.match(key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
        elif GATE_NAME in key:
            misnamed.append(key)
    if not found:
        return GateReport((), {}, (), tuple(sorted(misnamed)))
    beyond = sorted(n for n in found if n >= num_layers)
    if beyond:
        raise ValueError(
            f"checkpoint has gates for blocks {beyond} but the transformer has {num_layers} "
            "blocks; the gate weights belong to a different model"
        )
    complete = tuple(n for n in sorted(found) if found[n] == {"weight", "bias"})
    partial = {
        n: tuple(f"{GATE_NAME}.{w}" for w in ("weight", "bias") if w not in parts)
        for n, parts in sorted(found.items())
        if parts != {"weight", "bias"}
    }
    absent = tuple(n for n in range(num_layers) if n not in found)
    return GateReport(complete, partial, absent, tuple(sorted(misnamed)))


def read_gate_tensors(transformer_dir: str | Path) -> dict[str, torch.Tensor]:
    """The ``blocks.N.to_gate_compress.{weight,bias}`` tensors a checkpoint stores (may be
    empty); reads only those tensors, however large the checkpoint."""
    from safetensors import safe_open

    transformer_dir = _transformer_dir(Path(transformer_dir))
    by_file: dict[Path, list[str]] = {}
    for key, file in _weight_files(transformer_dir).items():
        if _GATE_KEY.match(key):
            by_file.setdefault(file, []).append(key)
    out = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                out[key] = f.get_tensor(key)
    return out


def load_gate_weights(transformer: nn.Module, gate_tensors: dict[str, torch.Tensor]) -> int:
    """Copy gate tensors into the transformer's gates (added, zero, where missing); return
    how many blocks received a gate. A block whose gate lacks its weight or its bias keeps
    a zero gate (half a trained gate is not the trained gate)."""
    gates = add_vsa_gates(transformer)
    report = gate_report(gate_tensors, len(gates))
    with torch.no_grad():
        for key, tensor in gate_tensors.items():
            match = _GATE_KEY.match(key)
            if match is None:
                raise ValueError(f"{key!r} is not a gate key blocks.N.{GATE_NAME}.(weight|bias)")
            n, which = int(match.group(1)), match.group(2)
            param = getattr(gates[n], which)
            if param.shape != tensor.shape:
                raise ValueError(
                    f"{key} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(param.shape)}; the gate weights belong to a different model"
                )
            if n in report.complete:
                param.copy_(tensor)
    return len(report.complete)


def expected_weight_keys(config: dict[str, Any]) -> set[str]:
    """The state-dict keys of a ``WanTransformer3DModel`` with ``config`` (built on the
    meta device: no memory, no weights)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    return set(model.state_dict())


class _DropUnusedWeightsReport:
    """A logging filter for diffusers' "weights ... were not used" warning."""

    def filter(self, record) -> bool:
        return "were not used when initializing" not in record.getMessage()


def load_transformer(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attention: str = "dense",
    sparsity: float | None = None,
    tile_size: tuple[int, int, int] = (4, 4, 4),
    backend: str = "auto",
    strict: bool = False,
) -> nn.Module:
    """Load a ``WanTransformer3DModel`` with its VSA gates (zero when the checkpoint has
    none) and set its self-attention (``"dense"``, or ``"vsa"`` with ``sparsity``).

    ``path``: a pipeline folder or its ``transformer/`` subfolder. A weight the model needs
    but the checkpoint lacks is a ValueError naming it; incomplete gates (some blocks, or a
    weight without its bias) and unknown keys are warned about by name, and are errors
    with ``strict=True``.
    """
    import logging
    import warnings

    from diffusers import WanTransformer3DModel

    tdir = _transformer_dir(Path(path))
    config = json.loads((tdir / "config.json").read_text())
    files = _weight_files(tdir)
    stored = set(files)
    expected = expected_weight_keys(config)
    missing = sorted(expected - stored)
    if missing:
        raise ValueError(
            f"the transformer weights in {str(tdir)!r} ({files_name(tdir)}) lack "
            f"{len(missing)} tensors the model needs: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; the checkpoint is incomplete or belongs "
            "to a different model (check config.json and re-download or re-export it)"
        )
    ignored = getattr(WanTransformer3DModel, "_keys_to_ignore_on_load_unexpected", None) or []
    report = gate_report(stored, int(config.get("num_layers", 0)))
    unknown = sorted(
        k
        for k in stored - expected
        if not _GATE_KEY.match(k)
        and k not in report.misnamed
        and not any(re.search(p, k) for p in ignored)
    )
    problems = []
    if report.incomplete:
        problems.append(report.problem(repr(str(tdir))))
    if unknown:
        problems.append(
            f"{len(unknown)} weights in {str(tdir)!r} are not used by WanTransformer3DModel: "
            f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    if problems and strict:
        raise ValueError("; ".join(problems) + " (strict load)")
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    # diffusers reports checkpoint keys it does not know; they were reported above.
    hush = _DropUnusedWeightsReport()
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_log.addFilter(hush)
    try:
        transformer = WanTransformer3DModel.from_pretrained(str(tdir), torch_dtype=dtype)
    finally:
        diffusers_log.removeFilter(hush)
    if device is not None:
        transformer = transformer.to(device)
    load_gate_weights(transformer, read_gate_tensors(tdir))
    set_attention(transformer, attention, sparsity=sparsity, tile_size=tile_size, backend=backend)
    return transformer.eval()


def files_name(tdir: Path) -> str:
    """How a transformer folder stores its weights, for messages."""
    index = tdir / WEIGHTS_INDEX_NAME
    return index.name if index.is_file() else WEIGHTS_NAME


# VAE classes fastwan provides itself (the toy world's pixel VAE), by config class name.
_FASTWAN_VAES = {"ToyPixelVAE": ("fastwan.toy.pixel_vae", "ToyPixelVAE")}


def load_vae(vae_dir: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The VAE of ``vae_dir`` (a pipeline's ``vae/`` folder): diffusers' ``AutoencoderKLWan``,
    or a fastwan VAE class named by ``_class_name`` in its config (eval mode, on the CPU)."""
    import importlib

    vae_dir = Path(vae_dir)
    config_file = vae_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(vae_dir)!r} has no config.json; pass a pipeline's vae/ folder")
    name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKLWan")
    if name in _FASTWAN_VAES:
        module, attr = _FASTWAN_VAES[name]
        cls = getattr(importlib.import_module(module), attr)
    else:
        from diffusers import AutoencoderKLWan as cls
    return cls.from_pretrained(str(vae_dir), torch_dtype=dtype).eval()


def load_scheduler(path: str | Path, flow_shift: float | None = None):
    """The pipeline's diffusers scheduler, with the flow shift replaced when given."""
    import diffusers

    sdir = Path(path) / "scheduler"
    config_file = sdir / "scheduler_config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(sdir)!r} has no scheduler_config.json")
    name = json.loads(config_file.read_text()).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown scheduler class {name!r} in {str(config_file)!r}")
    scheduler = cls.from_pretrained(str(sdir))
    return with_flow_shift(scheduler, flow_shift) if flow_shift is not None else scheduler


def with_flow_shift(scheduler, flow_shift: float):
    """A fresh copy of a flow-matching scheduler with its shift set to ``flow_shift``
    (UniPC calls it ``flow_shift``, FlowMatchEuler ``shift``)."""
    if flow_shift <= 0:
        raise ValueError(f"flow_shift must be > 0, got {flow_shift!r}")
    config = scheduler.config
    if "flow_shift" in config:
        return type(scheduler).from_config(config, flow_shift=float(flow_shift))
    if "shift" in config:
        return type(scheduler).from_config(config, shift=float(flow_shift))
    raise ValueError(f"{type(scheduler).__name__} has no flow shift; use a flow-matching scheduler")


@dataclass
class WanComponents:
    """Everything a Wan text-to-video pipeline folder holds, loaded."""

    path: Path
    model_index: dict[str, Any]
    identity: ModelIdentity
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any

    @property
    def preset(self) -> WanPreset:
        """The effective sampling defaults (see :mod:`fastwan.models.identity`)."""
        return self.identity.preset

    @property
    def sampling_sources(self) -> dict[str, str]:
        return self.identity.sources

    @property
    def expand_timesteps(self) -> bool:
        """Wan2.2 TI2V: one timestep per latent token (diffusers' ``expand_timesteps``)."""
        return self.identity.preset.expand_timesteps


def identify_folder(
    path_or_id: str | Path, *, preset: str | WanPreset | None = None
) -> tuple[Path, ModelIdentity]:
    """Resolve a model and read its identity from its JSON files and weight names only
    (fast: sizes and settings can be checked before any weight loads)."""
    path = resolve_model_path(path_or_id)
    read_model_index(path)
    tdir = _transformer_dir(path)
    config = json.loads((tdir / "config.json").read_text())
    report = gate_report(_weight_files(tdir), int(config.get("num_layers", 0)))
    source = None if Path(str(path_or_id)).expanduser().exists() else str(path_or_id)
    return path, identify(path, has_gates=report.has_gates, source=source, preset=preset)


def load_components(
    path_or_id: str | Path,
    *,
    preset: str | WanPreset | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    attention: str = "dense",
    sparsity: float | None = None,
    tile_size: tuple[int, int, int] = (4, 4, 4),
    backend: str = "auto",
    strict: bool = False,
) -> WanComponents:
    """Load all components on the CPU (the caller moves them). Sampling defaults come from
    the folder's own files, then a known preset (given, or matched by name or
    architecture), then diffusers' defaults (:func:`fastwan.models.identity.identify`)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    path, identity = identify_folder(path_or_id, preset=preset)
    transformer = load_transformer(
        path,
        dtype=dtype,
        attention=attention,
        sparsity=sparsity,
        tile_size=tile_size,
        backend=backend,
        strict=strict,
    )
    vae = load_vae(path / "vae", dtype=vae_dtype)
    text_encoder = UMT5EncoderModel.from_pretrained(str(path / "text_encoder"), dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return WanComponents(
        path=path,
        model_index=read_model_index(path),
        identity=identity,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=load_scheduler(path),
    )
