"""LoRA adapters on diffusers' Wan transformer, built on ``peft``: training and inference.

Training (:mod:`fastwan.methods`): :func:`add_adapter` injects a named adapter (peft's
``inject_adapter_in_model``) with a seeded, mesh-independent initialisation
(:func:`init_lora_weights`: the same numbers on one process and on any FSDP2 mesh);
several adapters may sit on one base and :func:`use_adapter` switches between them (or
off) without touching ``requires_grad`` -- every adapter keeps its gradients enabled, so
FSDP2's gathered parameters and the optimizers never see a flag change.
:func:`adapter_parameters` names an adapter's parameters.

Files: an adapter is exchanged as a **diffusers-format Wan LoRA** -- the safetensors file
``WanPipeline.save_lora_weights`` writes (``pytorch_lora_weights.safetensors``, keys
``transformer.blocks.N.attn1.to_q.lora_A.weight`` / ``lora_B.weight``, the peft config as
the file's ``lora_adapter_metadata``), which ``WanPipeline.load_lora_weights`` loads.
fastwan's VSA gates have no place in diffusers' Wan: a LoRA folder keeps them beside the
file as full tensors (``vsa_gates.safetensors``, keys ``blocks.N.to_gate_compress.*``, the
layout of FastWan checkpoints; :func:`save_lora`).

Inference: :func:`load_lora` (a file or such a folder, ours or any diffusers-format Wan LoRA,
and the formats diffusers converts: original Wan ``diffusion_model.*`` and musubi
``lora_unet_*``), :func:`set_lora_scale`, :func:`unload_lora`; :func:`merge_lora` folds
adapters into the base weights (``fastwan export --merge-lora``). A key of a LoRA file that
matches no layer of the transformer is an error naming it, never skipped.
"""

from __future__ import annotations

import json
import math
import re
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastwan.choices import LORA_INITS, check_choice
from fastwan.models.vsa import GATE_NAME, WanVSAAttnProcessor, add_vsa_gates, transformer_blocks

__all__ = [
    "DIFFUSERS_PREFIX",
    "GATES_FILE",
    "LORA_FILE",
    "LORA_META_FILE",
    "adapter_names",
    "adapter_parameters",
    "add_adapter",
    "init_lora_weights",
    "is_adapter_key",
    "load_lora",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
    "set_lora_scale",
    "unload_lora",
    "use_adapter",
]

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
GATES_FILE = "vsa_gates.safetensors"  # the student's VSA gates, beside the LoRA file
LORA_META_FILE = "fastwan_lora.json"  # what fastwan export knows about the adapter
DIFFUSERS_PREFIX = "transformer."  # diffusers' key prefix of the transformer's LoRA layers

# A peft adapter tensor in a parameter name: ``<module>.lora_A.<adapter>.weight`` etc.
_ADAPTER_PART = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")
# The same in a diffusers-format file (no adapter name): ``<module>.lora_A.weight``.
_FILE_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)\.(?P<leaf>\w+)$"
)
_GATE_BACKUP_ATTR = "_fastwan_lora_gate_backup"  # adapter -> the gate tensors it replaced


def is_adapter_key(name: str) -> bool:
    """Whether the parameter name ``name`` belongs to a peft adapter (``...lora_A...``)."""
    return _ADAPTER_PART.search(name) is not None


def _tuner_layer_cls() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def lora_layers(transformer: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(module name, layer)`` of every peft LoRA layer in ``transformer``."""
    from peft.tuners.lora import LoraLayer

    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(transformer: nn.Module) -> list[str]:
    """The adapters ``transformer`` holds, in the order they were added."""
    names: list[str] = []
    for _, layer in lora_layers(transformer):
        for name in layer.lora_A.keys():
            if name not in names:
                names.append(name)
    return names


def adapter_parameters(transformer: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter ``adapter_name``, by their names in ``transformer``."""
    part = re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(adapter_name)}\.")
    return {n: p for n, p in transformer.named_parameters() if part.search(n)}


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r} (lora.rank, e.g. 32)")
    return rank


def add_adapter(
    transformer: nn.Module,
    adapter_name: str,
    *,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str],
    dropout: float = 0.0,
    init: str = "default",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> list[str]:
    """Inject the LoRA adapter ``adapter_name`` (rank ``rank``, update ``alpha / rank * B A``;
    ``alpha`` None: ``rank``) into every Linear whose name is, or ends with, one of
    ``target_modules``; returns the adapted module names. The adapter's parameters are in
    ``dtype`` (default: each base layer's), on the base layer's device, initialised by
    :func:`init_lora_weights` (``init``, ``seed``); on a meta-device base they stay on the
    meta device until the network is materialised (call :func:`init_lora_weights` then).
    The global RNG is not touched. Other adapters stay active or inactive as they were."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = _check_rank(rank)
    check_choice(init, LORA_INITS, "lora.init")
    targets = [str(t) for t in target_modules]
    if not targets:
        raise ValueError(
            "target_modules is empty; name the Linear layers to adapt (lora.target_modules)"
        )
    if adapter_name in adapter_names(transformer):
        raise ValueError(
            f"the transformer already has an adapter {adapter_name!r}; pick another name"
        )
    active = {
        n: (list(layer.active_adapters), layer.disable_adapters)
        for n, layer in lora_layers(transformer)
    }
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha) if alpha is not None else float(rank),
        lora_dropout=float(dropout),
        target_modules=targets,
        init_lora_weights=True,
    )
    with warnings.catch_warnings():  # a second adapter on one model is the intent here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        try:
            # low_cpu_mem_usage: the adapter starts on the meta device (no RNG drawn); it
            # is given memory and seeded values below
            inject_adapter_in_model(config, transformer, adapter_name, low_cpu_mem_usage=True)
        except ValueError as err:
            raise ValueError(
                f"lora.target_modules {targets} match no Linear layer of the transformer "
                f"({err}); use names such as {['to_q', 'to_k', 'to_v', 'to_out.0']}"
            ) from None
    adapted = []
    for name, layer in lora_layers(transformer):
        if adapter_name not in layer.lora_A:
            continue
        adapted.append(name)
        base = layer.get_base_layer().weight
        want = dtype if dtype is not None else base.dtype
        for part in (layer.lora_A, layer.lora_B):
            module = part[adapter_name]
            if not base.is_meta:
                module.to_empty(device=base.device)
            module.to(dtype=want)
        if name in active:  # injecting switched this layer's active adapter: restore it
            names, disabled = active[name]
            _set_active(layer, names, disabled)
        else:  # a new LoRA layer: the adapter is active, as on every other new layer
            _set_active(layer, [adapter_name], False)
    if not any(p.is_meta for p in adapter_parameters(transformer, adapter_name).values()):
        init_lora_weights(transformer, adapter_name, init=init, seed=seed)
    _refresh_gates(transformer)
    return adapted


def _name_seed(seed: int, adapter_name: str, module_name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(f"{adapter_name}:{module_name}".encode())) % 2**63


def _write_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor ``full`` into ``param`` (for a DTensor: its local shard only)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            from fastwan.models.loading import _local_index

            local = param.to_local()
            if local.numel():
                local.copy_(full[_local_index(param)])
        else:
            param.copy_(full)


@torch.no_grad()
def init_lora_weights(
    transformer: nn.Module, adapter_name: str, *, init: str = "default", seed: int = 0
) -> None:
    """(Re)initialise adapter ``adapter_name``: B = 0 and A from a generator seeded with
    ``seed``, the adapter and the layer's name -- ``default``: uniform in +-1/sqrt(fan_in)
    (peft's kaiming-uniform, as ``nn.Linear``), ``gaussian``: N(0, 1/rank). The values are
    drawn in full on the CPU and each rank keeps its shard, so one process and any FSDP2
    mesh start from the same adapter."""
    check_choice(init, LORA_INITS, "lora.init")
    found = False
    for name, layer in lora_layers(transformer):
        if adapter_name not in layer.lora_A:
            continue
        found = True
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if a.is_meta or b.is_meta:
            raise ValueError(
                f"{name}: adapter {adapter_name!r} is still on the meta device; materialise the "
                "network (fastwan.distributed.parallelize.materialize) first"
            )
        g = torch.Generator().manual_seed(_name_seed(seed, adapter_name, name))
        rank, fan_in = a.shape
        if init == "default":
            bound = 1.0 / math.sqrt(fan_in)
            full_a = torch.empty(rank, fan_in).uniform_(-bound, bound, generator=g)  # [r, in]
        else:
            full_a = torch.randn(rank, fan_in, generator=g) / rank  # [r, in]
        _write_full(a, full_a.to(a.dtype))
        _write_full(b, torch.zeros(b.shape, dtype=b.dtype))  # [out, r]
        bias = getattr(layer.lora_B[adapter_name], "bias", None)
        if bias is not None:
            _write_full(bias, torch.zeros(bias.shape, dtype=bias.dtype))
    if not found:
        raise ValueError(
            f"the transformer has no adapter {adapter_name!r} (it has {adapter_names(transformer)})"
        )


def _set_active(layer: nn.Module, names: Sequence[str], disabled: bool) -> None:
    # peft's set_adapter / enable_adapters also flip requires_grad on the adapters; the
    # trainers keep every adapter trainable (FSDP2 gathers each parameter with the flag it
    # had when sharded) and only choose which one runs, so the two fields are set directly.
    layer._active_adapter = list(names)
    layer._disable_adapters = bool(disabled)


def use_adapter(transformer: nn.Module, adapter: str | Sequence[str] | None) -> None:
    """Run ``transformer`` with adapter ``adapter`` alone (several: their sum; ``None``: no
    adapter, the base model). ``requires_grad`` is left as it is."""
    names = [] if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    have = adapter_names(transformer)
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ValueError(f"the transformer has no adapter {unknown[0]!r} (it has {have})")
    for _, layer in lora_layers(transformer):
        _set_active(layer, names, disabled=not names)


def set_lora_scale(transformer: nn.Module, scale: float, adapter_name: str | None = None) -> None:
    """Scale adapter ``adapter_name`` (every adapter: None) to ``scale`` x its trained
    strength (``alpha / rank``); 0 removes its effect, 1 restores it. VSA gates loaded from a
    LoRA folder are full weights and are not scaled."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"lora scale must be a finite number (1 = as trained), got {scale!r}")
    have = adapter_names(transformer)
    if not have:
        raise ValueError("the transformer has no LoRA adapter; load one with load_lora first")
    if adapter_name is not None and adapter_name not in have:
        raise ValueError(f"the transformer has no adapter {adapter_name!r} (it has {have})")
    for _, layer in lora_layers(transformer):
        for name in [adapter_name] if adapter_name is not None else have:
            layer.set_scale(name, float(scale))


def _refresh_gates(transformer: nn.Module) -> None:
    """Point every VSA processor at its block's current gate module (a LoRA layer once
    the gates carry an adapter, the plain Linear again after unloading)."""
    try:
        blocks = transformer_blocks(transformer)
    except ValueError:
        return
    for block in blocks:
        proc = getattr(block.attn1, "processor", None)
        gate = getattr(block, GATE_NAME, None)
        if isinstance(proc, WanVSAAttnProcessor) and gate is not None:
            proc.gate = gate


# ------------------------------------------------------------------------------ files


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return (t.full_tensor() if isinstance(t, DTensor) else t).cpu().contiguous()


def lora_state_dict(
    transformer: nn.Module, adapter_name: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adapter ``adapter_name`` in diffusers' layout, without the gates: ``({module.lora_A.weight:
    [r, in], module.lora_B.weight: [out, r]}, its peft config as diffusers' metadata)`` (keys
    without the ``transformer.`` prefix, which :func:`save_lora` adds)."""
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, layer in lora_layers(transformer):
        if adapter_name not in layer.lora_A or name.split(".")[-1] == GATE_NAME:
            continue
        state[f"{name}.lora_A.weight"] = _full(layer.lora_A[adapter_name].weight)
        state[f"{name}.lora_B.weight"] = _full(layer.lora_B[adapter_name].weight)
        ranks[name] = int(layer.r[adapter_name])
        alphas[name] = float(layer.lora_alpha[adapter_name])
    if not state:
        raise ValueError(f"the transformer has no adapter {adapter_name!r} outside the VSA gates")
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    metadata = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),  # exact names: diffusers adapts exactly these
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
    }
    return state, metadata


@torch.no_grad()
def merged_gates(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """Every block's VSA gate as full tensors ``blocks.N.to_gate_compress.{weight,bias}``,
    with any active gate adapter folded in (``W + scale * B A``)."""
    out = {}
    for i, block in enumerate(transformer_blocks(transformer)):
        gate = getattr(block, GATE_NAME, None)
        if gate is None:
            continue
        base = gate.get_base_layer() if hasattr(gate, "get_base_layer") else gate
        weight = _full(base.weight).float()  # [dim, dim]
        if hasattr(gate, "lora_A") and not gate.disable_adapters:
            for name in gate.active_adapters:
                if name in gate.lora_A:
                    a = _full(gate.lora_A[name].weight).float()  # [r, dim]
                    b = _full(gate.lora_B[name].weight).float()  # [dim, r]
                    weight = weight + gate.scaling[name] * (b @ a)
        out[f"blocks.{i}.{GATE_NAME}.weight"] = weight.to(base.weight.dtype)
        out[f"blocks.{i}.{GATE_NAME}.bias"] = _full(base.bias)
    return out


def save_lora(
    transformer: nn.Module,
    out_dir: str | Path,
    adapter_name: str,
    *,
    gates: bool = True,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` to ``out_dir`` as diffusers writes a Wan LoRA
    (``WanPipeline.save_lora_weights``: :data:`LORA_FILE` with the peft config as its
    metadata), plus, with ``gates``, every block's VSA gate as full tensors
    (:data:`GATES_FILE`, gate adapters folded in), and ``info`` (JSON) as
    :data:`LORA_META_FILE`. Returns ``out_dir``."""
    from diffusers import WanPipeline
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state, metadata = lora_state_dict(transformer, adapter_name)
    WanPipeline.save_lora_weights(
        str(out_dir),
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=metadata,
        weight_name=LORA_FILE,
    )
    if gates:
        tensors = merged_gates(transformer)
        if tensors:
            save_file(tensors, str(out_dir / GATES_FILE), metadata={"format": "pt"})
    if info is not None:
        (out_dir / LORA_META_FILE).write_text(json.dumps(dict(info), indent=2) + "\n")
    return out_dir


def _lora_file(path: Path) -> tuple[Path, Path | None]:
    """The LoRA safetensors file of ``path`` (a file, or a folder holding one) and the
    folder's gates file (None when there is none)."""
    if path.is_file():
        gates = path.parent / GATES_FILE if path.name == LORA_FILE else None
        return path, gates if gates is not None and gates.is_file() else None
    if not path.is_dir():
        raise ValueError(
            f"LoRA {str(path)!r} does not exist; pass a .safetensors file or its folder"
        )
    file = path / LORA_FILE
    if not file.is_file():
        found = sorted(p.name for p in path.glob("*.safetensors") if p.name != GATES_FILE)
        if len(found) != 1:
            raise ValueError(
                f"{str(path)!r} has no {LORA_FILE}"
                + (
                    f" but several LoRA files ({', '.join(found)}): pass one of them"
                    if found
                    else ""
                )
            )
        file = path / found[0]
    gates = path / GATES_FILE
    return file, gates if gates.is_file() else None


def _read_lora(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The file's LoRA tensors in diffusers' layout (converted from the formats diffusers
    converts) and its adapter metadata (None when it has none)."""
    from diffusers import WanPipeline

    state, metadata = WanPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    # diffusers keeps each component's config under its prefix ("transformer.r", ...)
    prefix = DIFFUSERS_PREFIX
    own = {k[len(prefix) :]: v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    return dict(state), (own or None)


def _parse_keys(
    transformer: nn.Module, state: Mapping[str, torch.Tensor], file: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"lora_A.weight": ..., "lora_B.weight": ..., ...}; every key that does
    not name a LoRA tensor of a Linear layer of ``transformer`` is an error naming them."""
    from peft.tuners.lora import LoraLayer

    modules = dict(transformer.named_modules())
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    why: dict[str, str] = {}
    for key, tensor in state.items():
        name = key[len(DIFFUSERS_PREFIX) :] if key.startswith(DIFFUSERS_PREFIX) else None
        match = _FILE_KEY.match(name) if name is not None else None
        if match is None:
            bad.append(key)
            why.setdefault(
                "shape", "not a transformer LoRA tensor (transformer.<layer>.lora_A/B.weight)"
            )
            continue
        module = modules.get(match["module"])
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
        if not isinstance(module, nn.Linear):
            bad.append(key)
            why.setdefault("layer", "no Linear layer of that name in this transformer")
            continue
        by_module.setdefault(match["module"], {})[f"{match['part']}.{match['leaf']}"] = tensor
    for name, parts in by_module.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            bad.extend(f"{DIFFUSERS_PREFIX}{name}.{p}" for p in parts)
            why.setdefault("pair", "lora_A or lora_B missing for that layer")
    if bad:
        listed = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ValueError(
            f"LoRA {str(file)!r}: {len(bad)} of its {len(state)} keys match no layer of this "
            f"transformer ({'; '.join(why.values())}): {listed}. Is it a LoRA for this model "
            "(Wan, the same size and variant)?"
        )
    return by_module


def _config_of(
    by_module: Mapping[str, Mapping[str, torch.Tensor]], metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    """peft LoraConfig arguments: exact target names; ranks from the shapes; alphas from
    the metadata (diffusers' convention without it: alpha = rank, scale 1)."""
    ranks = {n: int(p["lora_A.weight"].shape[0]) for n, p in by_module.items()}
    if metadata is not None and "lora_alpha" in metadata:
        r = int(metadata.get("r", next(iter(ranks.values()))))
        default_alpha = float(metadata["lora_alpha"])
        pattern = {str(k): float(v) for k, v in (metadata.get("alpha_pattern") or {}).items()}
        alphas = {}
        for n in ranks:
            alphas[n] = next(
                (a for k, a in pattern.items() if n == k or n.endswith("." + k)), default_alpha
            )
    else:
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alphas = {n: float(k) for n, k in ranks.items()}
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(by_module),
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "use_dora": any("lora_magnitude_vector.weight" in p for p in by_module.values()),
        "lora_bias": any("lora_B.bias" in p for p in by_module.values()),
    }


@torch.no_grad()
def load_lora(
    transformer: nn.Module, path: str | Path, scale: float = 1.0, adapter_name: str = "default"
) -> str:
    """Load a diffusers-format Wan LoRA (a ``.safetensors`` file, or a folder with
    :data:`LORA_FILE` -- and the VSA gates of a fastwan LoRA export, :data:`GATES_FILE`)
    into ``transformer`` as adapter ``adapter_name`` at strength ``scale``; returns the
    name. Adapters loaded before stay active (their effects add up). Every key must match a
    Linear layer of the transformer (a ValueError names those that do not, and nothing is
    loaded). Undo with :func:`unload_lora`."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    path = Path(path)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"adapter_name must be a non-empty name without dots, got {adapter_name!r}"
        )
    if adapter_name in adapter_names(transformer):
        raise ValueError(
            f"the transformer already has an adapter {adapter_name!r}; unload_lora it first or "
            "pass another adapter_name"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"lora scale must be a finite number (1 = as trained), got {scale!r}")
    file, gates_file = _lora_file(path)
    state, metadata = _read_lora(file)
    if not state:
        raise ValueError(f"LoRA {str(file)!r} holds no tensors")
    by_module = _parse_keys(transformer, state, file)
    kwargs = _config_of(by_module, metadata)
    running = _running_adapters(transformer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(
            LoraConfig(**kwargs), transformer, adapter_name, low_cpu_mem_usage=True
        )
    peft_state = {}
    for name, parts in by_module.items():
        layer = transformer.get_submodule(name)
        base = layer.get_base_layer().weight
        dtype = base.dtype if base.is_floating_point() else torch.float32
        for part, tensor in parts.items():
            peft_state[f"{name}.{part}"] = tensor.to(device=base.device, dtype=dtype)
    result = set_peft_model_state_dict(
        transformer, peft_state, adapter_name=adapter_name, low_cpu_mem_usage=True
    )
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    still_meta = [n for n, p in adapter_parameters(transformer, adapter_name).items() if p.is_meta]
    if unexpected or still_meta:
        unload_lora(transformer, adapter_name)
        raise ValueError(
            f"LoRA {str(file)!r} did not load: "
            + (
                f"keys without a layer: {unexpected[:8]}"
                if unexpected
                else f"layers left without weights: {still_meta[:8]}"
            )
        )
    for _, layer in lora_layers(transformer):  # the adapters that ran before, and this one
        _set_active(layer, [*running, adapter_name], disabled=False)
    set_lora_scale(transformer, scale, adapter_name)
    if gates_file is not None:
        _load_gates(transformer, gates_file, adapter_name)
    _refresh_gates(transformer)
    return adapter_name


def _running_adapters(transformer: nn.Module) -> list[str]:
    """The adapters that run (active and not disabled on some layer), in load order."""
    running = set()
    for _, layer in lora_layers(transformer):
        if not layer.disable_adapters:
            running.update(layer.active_adapters)
    return [n for n in adapter_names(transformer) if n in running]


def _load_gates(transformer: nn.Module, gates_file: Path, adapter_name: str) -> None:
    """The folder's full VSA gates into the transformer's gates; the values they replace
    are kept so that :func:`unload_lora` restores them."""
    from safetensors.torch import load_file

    from fastwan.models.loading import load_gate_weights

    tensors = load_file(str(gates_file))
    backup = {}
    for i, gate in enumerate(add_vsa_gates(transformer)):  # a LoRA layer reads through
        backup[f"blocks.{i}.{GATE_NAME}.weight"] = gate.weight.detach().clone()
        backup[f"blocks.{i}.{GATE_NAME}.bias"] = gate.bias.detach().clone()
    load_gate_weights(transformer, tensors)
    store = getattr(transformer, _GATE_BACKUP_ATTR, None)
    if store is None:
        store = {}
        setattr(transformer, _GATE_BACKUP_ATTR, store)
    store[adapter_name] = backup


def _replace_with_base(transformer: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        layer = transformer.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, layer.get_base_layer())


def _forget_config(transformer: nn.Module, names: Iterable[str]) -> None:
    config = getattr(transformer, "peft_config", None)
    if isinstance(config, dict):
        for name in names:
            config.pop(name, None)
        if not config:
            try:
                delattr(transformer, "peft_config")
            except AttributeError:
                pass


@torch.no_grad()
def unload_lora(transformer: nn.Module, adapter_name: str | None = None) -> None:
    """Remove adapter ``adapter_name`` (every adapter: None) from ``transformer``, and the
    VSA gates its folder brought (the gates it replaced come back); layers left without
    adapters become their plain Linear again."""
    have = adapter_names(transformer)
    if adapter_name is not None and adapter_name not in have:
        raise ValueError(f"the transformer has no adapter {adapter_name!r} (it has {have})")
    names = have if adapter_name is None else [adapter_name]
    empty = []
    for lname, layer in lora_layers(transformer):
        remaining = [n for n in layer.active_adapters if n not in names]
        disabled = layer.disable_adapters
        for name in names:
            for attr in layer.adapter_layer_names + layer.other_param_names:
                container = getattr(layer, attr, None)
                if (
                    isinstance(container, (dict, nn.ModuleDict, nn.ParameterDict))
                    and name in container
                ):
                    del container[name]
        _set_active(layer, remaining, disabled or not remaining)
        if not layer.lora_A and not getattr(layer, "lora_embedding_A", {}):
            empty.append(lname)
    _replace_with_base(transformer, empty)
    _forget_config(transformer, names)
    store = getattr(transformer, _GATE_BACKUP_ATTR, {})
    for name in reversed(names):  # the gates as they were before those adapters loaded
        backup = store.pop(name, None)
        if backup is not None:
            from fastwan.models.loading import load_gate_weights

            load_gate_weights(transformer, backup)
    _refresh_gates(transformer)


@torch.no_grad()
def merge_lora(transformer: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold adapter ``adapter_name`` (the active ones: None) into the base weights at its
    current scale (``W <- W + scale * B A``) and remove every adapter: the plain transformer
    computes what the adapted one did. Returns ``transformer`` (changed in place)."""
    have = adapter_names(transformer)
    if not have:
        raise ValueError("the transformer has no LoRA adapter to merge")
    if adapter_name is not None and adapter_name not in have:
        raise ValueError(f"the transformer has no adapter {adapter_name!r} (it has {have})")
    names = []
    for name, layer in lora_layers(transformer):
        use = (
            [adapter_name]
            if adapter_name is not None
            else ([] if layer.disable_adapters else list(layer.active_adapters))
        )
        use = [n for n in use if n in layer.lora_A]
        if use:
            layer.merge(adapter_names=use)
        names.append(name)
    _replace_with_base(transformer, names)
    _forget_config(transformer, have)
    _refresh_gates(transformer)
    return transformer
