"""Loading Wan pipelines from Diffusers-format folders (local, or the hub where reachable).

A folder holds ``model_index.json`` and the components ``transformer/`` (diffusers'
``WanTransformer3DModel``), ``vae/`` (``AutoencoderKLWan``), ``text_encoder/`` (transformers'
``UMT5EncoderModel``), ``tokenizer/`` and ``scheduler/``. The transformer may carry VSA gates
(``blocks.N.to_gate_compress.*``, FastWan's layout); diffusers ignores those keys, fastwan
loads them into the gates it adds.

A transformer can also be built on the meta device (``load_transformer(...,
device="meta")``: checked, no weight read) and filled after it is sharded
(:func:`load_pending_weights`: each rank reads only its shards). Names of models that ship
inside an installed package resolve through ``fastwan.BUNDLED_MODELS`` or a caller's
resolver, VAE classes beside diffusers' through :func:`register_vae_class` or the
pipeline's ``model_index.json``: nothing here imports the packages above it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastwan.models.identity import ModelIdentity, identify
from fastwan.models.presets import PRESETS, WanPreset, get_preset
from fastwan.models.vsa import GATE_NAME, add_vsa_gates, set_attention

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# Wan2.1 I2V's CLIP: optional components of an image-to-video folder
IMAGE_COMPONENTS = ("image_encoder", "image_processor")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_GATE_KEY = re.compile(rf"^blocks\.(\d+)\.{GATE_NAME}\.(weight|bias)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


ModelResolver = Callable[[str], "Path | None"]


def resolve_model_path(path_or_id: str | Path, *, resolver: ModelResolver | None = None) -> Path:
    """A local Diffusers folder as is; a preset name or hub repo id downloaded through
    ``huggingface_hub`` (a clear error when there is no network).

    resolver: tried first on a name that is not a local path: the folder of a name it
    knows, else None (how a layer above this one resolves names of its own). Presets whose
    weights ship inside an installed package (``bundled``: the toy world's) are found by
    the locators the distribution declares in ``fastwan.BUNDLED_MODELS``."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {str(path)!r} is a file; pass the pipeline folder")
        return path
    name = str(path_or_id)
    if resolver is not None:
        found = resolver(name)
        if found is not None:
            return resolve_model_path(found)
    try:
        preset = get_preset(name)
    except ValueError:
        preset = None
    if preset is not None and preset.bundled:  # weights inside an installed package
        return _bundled_folder(preset.name)
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


def _bundled_folder(name: str) -> Path:
    """The folder of a bundled preset, from the first locator of ``fastwan.BUNDLED_MODELS``
    (``"module:function"``, imported now) whose module is installed."""
    import fastwan

    missing = []
    for spec in getattr(fastwan, "BUNDLED_MODELS", ()):
        module, _, attr = spec.partition(":")
        try:
            locate = getattr(importlib.import_module(module), attr)
        except ImportError as err:
            if not err.name or not (module == err.name or module.startswith(err.name + ".")):
                raise  # the module is there but broken: say so
            missing.append(module)
            continue
        return Path(locate(name))
    raise ValueError(
        f"preset {name!r} ships its weights inside fastwan ({', '.join(missing) or 'no package'}"
        " declared in fastwan.BUNDLED_MODELS), which this install lacks; pass the model's "
        "local folder instead"
    )


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


def _check_weights(tdir: Path, config: dict[str, Any], strict: bool) -> tuple[dict, GateReport]:
    """The checkpoint's tensor files and gate report, after the checks of
    :func:`load_transformer` (missing weights: ValueError; the rest warned, or raised when
    ``strict``)."""
    import warnings

    from diffusers import WanTransformer3DModel

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
        warnings.warn(problem, stacklevel=3)  # the caller of load_transformer
    return files, report


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

    ``device="meta"``: the same checks (and the checkpoint's shapes), but no weight is
    read: the parameters stay on the meta device with the dtypes a real load gives them,
    the rotary tables (buffers) are real CPU tensors. Shard or wrap the module, move it
    with ``to_empty`` and fill it with :func:`load_pending_weights`, which reads each
    rank's own shards only (:func:`fastwan.distributed.parallelize.materialize` does all
    three).
    """
    import logging

    from diffusers import WanTransformer3DModel

    tdir = _transformer_dir(Path(path))
    config = json.loads((tdir / "config.json").read_text())
    files, report = _check_weights(tdir, config, strict)
    if device is not None and torch.device(device).type == "meta":
        transformer = _empty_transformer(tdir, config, files, report, dtype)
    else:
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


# ----------------------------------------------------------- meta-device builds

_PENDING_ATTR = "_fastwan_pending_weights"
# Wrapper modules that prefix parameter names (activation checkpointing, torch.compile,
# FSDP1, a peft LoRA layer around the Linear it adapts): a checkpoint key is the name
# without them.
_WRAPPER_NAMES = frozenset(
    {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module", "base_layer"}
)
# A peft LoRA adapter's tensors (``...lora_A.<adapter>.weight``): no checkpoint has them;
# they load as zeros, and fastwan.models.lora.init_lora_weights gives them their values.
_ADAPTER_KEY = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


@dataclass(frozen=True)
class PendingWeights:
    """Where the weights of a transformer built on the meta device are: each checkpoint
    key's safetensors file, and the blocks whose VSA gate the checkpoint holds (complete:
    weight and bias); every other gate is zero, as in a real load. A copy of the module
    (``copy.deepcopy``) reads the same weights."""

    transformer_dir: str
    files: dict[str, str]
    gate_blocks: frozenset[int]


def _init_contexts(dtype: torch.dtype | None) -> contextlib.ExitStack:
    """What diffusers' ``from_pretrained`` builds a model under: the default dtype set to
    ``dtype``, weight initialisers skipped, parameters (not buffers) on the meta device."""
    from accelerate import init_empty_weights

    stack = contextlib.ExitStack()
    if dtype is not None and dtype.is_floating_point:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        stack.callback(torch.set_default_dtype, previous)
    try:
        from diffusers.models.modeling_utils import no_init_weights

        stack.enter_context(no_init_weights())
    except ImportError:  # initialisers on meta tensors draw nothing anyway
        pass
    stack.enter_context(init_empty_weights(include_buffers=False))
    return stack


def _empty_transformer(
    tdir: Path,
    config: dict[str, Any],
    files: dict[str, Path],
    report: GateReport,
    dtype: torch.dtype | None,
) -> nn.Module:
    """A ``WanTransformer3DModel`` (with VSA gates) whose parameters are on the meta device
    with the dtypes ``from_pretrained(torch_dtype=dtype)`` gives them (modules of
    ``_keep_in_fp32_modules`` in float32), its buffers built as there; checked against the
    checkpoint's shapes."""
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    with _init_contexts(dtype):
        model = WanTransformer3DModel.from_config(config)
    keep = list(getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or [])
    for module_name, module in model.named_modules():
        for leaf, param in list(module._parameters.items()):
            if param is None or not param.is_floating_point():
                continue
            full = f"{module_name}.{leaf}" if module_name else leaf
            fp32 = dtype is None or any(k in full.split(".") for k in keep)
            want = torch.float32 if fp32 else dtype
            if param.dtype != want:
                module._parameters[leaf] = nn.Parameter(
                    torch.empty_like(param, dtype=want), requires_grad=param.requires_grad
                )
    model.register_to_config(_name_or_path=str(tdir))
    add_vsa_gates(model)  # on the meta device; zero unless the checkpoint has the gate
    shapes = dict(_state_tensors(model))
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        if key in shapes:
            by_file.setdefault(file, []).append(key)
    wrong = []
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                have = tuple(f.get_slice(key).get_shape())
                if have != tuple(shapes[key].shape):
                    wrong.append((key, have, tuple(shapes[key].shape)))
    if wrong:
        key, have, want = wrong[0]
        gate = " the gate weights belong to a different model" if _GATE_KEY.match(key) else ""
        raise ValueError(
            f"{len(wrong)} transformer weights in {str(tdir)!r} have the wrong shape, e.g. "
            f"{key} has shape {have}, the model expects {want};{gate or ' the checkpoint belongs'}"
            f"{'' if gate else ' to a different model (check config.json)'}"
        )
    setattr(
        model,
        _PENDING_ATTR,
        PendingWeights(
            str(tdir), {k: str(f) for k, f in files.items()}, frozenset(report.complete)
        ),
    )
    return model


def pending_weights(net: nn.Module) -> PendingWeights | None:
    """The weights a meta-built transformer still has to read (None: it has its weights)."""
    return getattr(net, _PENDING_ATTR, None)


def _state_tensors(net: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint key, tensor)`` of every parameter and persistent buffer of ``net``,
    wrapper prefixes removed."""
    seen = set()
    for module_name, module in net.named_modules():
        skip = module._non_persistent_buffers_set
        tensors = list(module._parameters.items())
        tensors += [(n, b) for n, b in module._buffers.items() if n not in skip]
        for leaf, tensor in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            parts = [p for p in f"{module_name}.{leaf}".split(".") if p and p not in _WRAPPER_NAMES]
            yield ".".join(parts), tensor


def _local_index(t: torch.Tensor) -> tuple[slice, ...]:
    """The part of the full tensor that this rank's shard of DTensor ``t`` holds
    (``torch.chunk`` along each ``Shard`` dimension of its mesh, as DTensor and FSDP2 cut)."""
    start = [0] * t.dim()
    size = list(t.shape)
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not in the DTensor's mesh")
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard():
            raise ValueError(f"cannot load weights into a {placement} DTensor")
        d = placement.dim % t.dim()
        chunk = -(-size[d] // t.device_mesh.size(mesh_dim))  # ceil
        offset = min(coordinate[mesh_dim] * chunk, size[d])
        start[d] += offset
        size[d] = max(0, min(chunk, size[d] - offset))
    return tuple(slice(a, a + n) for a, n in zip(start, size))


# safetensors dtype names (the format's little-endian encodings).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _RowReader:
    """Reads leading-dimension row ranges of a safetensors file's tensors with plain file
    reads straight into the destination (no memory map: only the bytes of the rows asked
    for are read, and the process holds no pages of the file)."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        size = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(size))
        self.base = 8 + size

    def close(self) -> None:
        self.file.close()

    def read_into(self, key: str, rows: slice | None, out: torch.Tensor) -> bool:
        """Rows ``rows`` (all: None) of tensor ``key`` into ``out`` (cast to its dtype);
        False when the tensor's dtype is not one this reader knows."""
        import sys

        info = self.header[key]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None or sys.byteorder != "little":
            return False
        shape = list(info["shape"])
        row = 1
        for n in shape[1:]:
            row *= n
        itemsize = torch.empty((), dtype=dtype).element_size()
        first = rows.start if rows is not None else 0
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(out.shape, dtype=dtype)
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        self.file.seek(self.base + info["data_offsets"][0] + first * row * itemsize)
        done = 0
        while done < len(view):
            n = self.file.readinto(view[done:])
            if not n:
                raise ValueError(f"{self.file.name} ends inside tensor {key}: a truncated file")
            done += n
        if not direct:
            out.copy_(buf)
        return True


def _read_into(rows: _RowReader, f: Any, key: str, target: torch.Tensor) -> None:
    """Copy checkpoint tensor ``key`` into ``target`` (cast to its dtype): for a DTensor,
    only its local shard is read. ``rows`` reads leading-dimension ranges (FSDP2's
    ``Shard(0)``: contiguous bytes); ``f()`` is the file opened with safetensors, for any
    other layout."""
    from torch.distributed.tensor import DTensor

    if isinstance(target, DTensor):
        local = target.to_local()
        index = _local_index(target)
        if tuple(s.stop - s.start for s in index) != tuple(local.shape):
            raise RuntimeError(
                f"{key}: local shard {tuple(local.shape)} is not the {index} fastwan expects "
                f"of {tuple(target.shape)} placed {target.placements}"
            )
        if local.numel() == 0:
            return
        whole = all(s == slice(0, n) for s, n in zip(index[1:], target.shape[1:]))
        if whole and rows.read_into(key, index[0] if index else None, local):
            return
        local.copy_(f().get_slice(key)[index] if index else f().get_tensor(key))
    elif not rows.read_into(key, None, target):
        target.copy_(f().get_tensor(key))


def load_pending_weights(net: nn.Module) -> None:
    """Fill a transformer built by ``load_transformer(..., device="meta")`` from its
    checkpoint, once its parameters are real (``to_empty``), sharded or not: the values a
    real load gives (the same casts; gates zero where the checkpoint has none), each
    FSDP2 shard read from the file by its own rank (only its rows). No-op for a network
    that has its weights."""
    from safetensors import safe_open

    pending = pending_weights(net)
    if pending is None:
        return
    by_file: dict[str, list[tuple[str, torch.Tensor]]] = {}
    zero = []
    missing = []
    for key, tensor in _state_tensors(net):
        if tensor.is_meta:
            raise ValueError(
                f"{key} is still on the meta device: move the network with to_empty(device=...) "
                "before loading its weights"
            )
        match = _GATE_KEY.match(key)
        if (match and int(match.group(1)) not in pending.gate_blocks) or _ADAPTER_KEY.search(key):
            zero.append(tensor)
        elif key in pending.files:
            by_file.setdefault(pending.files[key], []).append((key, tensor))
        else:
            missing.append(key)
    if missing:
        raise ValueError(
            f"the transformer weights in {pending.transformer_dir!r} lack {len(missing)} "
            f"tensors the model needs: {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    with torch.no_grad():
        for tensor in zero:
            tensor.zero_()
        for file, items in by_file.items():
            rows = _RowReader(file)
            with contextlib.ExitStack() as stack:
                stack.callback(rows.close)
                opened: list = []

                def f(file=file, opened=opened, stack=stack):  # safetensors, when needed
                    if not opened:
                        opened.append(stack.enter_context(safe_open(file, framework="pt")))
                    return opened[0]

                for key, tensor in items:
                    _read_into(rows, f, key, tensor)
    delattr(net, _PENDING_ATTR)


def files_name(tdir: Path) -> str:
    """How a transformer folder stores its weights, for messages."""
    index = tdir / WEIGHTS_INDEX_NAME
    return index.name if index.is_file() else WEIGHTS_NAME


# VAE classes beside diffusers' (e.g. the toy world's pixel VAE), by config class name:
# registered by the packages that define them (register_vae_class).
_VAE_CLASSES: dict[str, type] = {}


def register_vae_class(cls: type, name: str | None = None) -> type:
    """Let :func:`load_vae` load folders whose ``config.json`` ``_class_name`` is ``name``
    (default ``cls.__name__``) with ``cls`` (a diffusers ``ModelMixin`` with
    ``from_pretrained``); returns ``cls`` (usable as a class decorator)."""
    _VAE_CLASSES[name or cls.__name__] = cls
    return cls


def _vae_class(vae_dir: Path, name: str, classes: Mapping[str, type] | None) -> type:
    """The class of a VAE folder: ``classes``, then the registered ones, then the class its
    pipeline's ``model_index.json`` names (``"vae": [module, class]``, a module under
    ``fastwan.``), else diffusers' ``AutoencoderKLWan``."""
    if classes and name in classes:
        return classes[name]
    if name in _VAE_CLASSES:
        return _VAE_CLASSES[name]
    index_file = vae_dir.parent / "model_index.json"
    if index_file.is_file():
        entry = json.loads(index_file.read_text()).get(vae_dir.name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] == name:
            module = str(entry[0])
            if module.startswith("fastwan."):
                cls = getattr(importlib.import_module(module), name, None)
                if cls is None:
                    raise ValueError(
                        f"{str(index_file)!r} names VAE class {name} in {module}, which has none"
                    )
                return cls
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan


def load_vae(
    vae_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    classes: Mapping[str, type] | None = None,
) -> nn.Module:
    """The VAE of ``vae_dir`` (a pipeline's ``vae/`` folder): diffusers' ``AutoencoderKLWan``,
    or the class named by ``_class_name`` in its config when ``classes`` maps it, it was
    registered (:func:`register_vae_class`) or the pipeline's ``model_index.json`` names
    its fastwan module (eval mode, on the CPU)."""
    vae_dir = Path(vae_dir)
    config_file = vae_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(vae_dir)!r} has no config.json; pass a pipeline's vae/ folder")
    name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKLWan")
    cls = _vae_class(vae_dir, str(name), classes)
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
    """Everything a Wan pipeline folder holds, loaded. ``text_encoder`` / ``tokenizer`` may
    be ``None`` when prompts come as embeddings (training's validation);
    ``image_encoder`` / ``image_processor`` are Wan2.1 I2V's CLIP (``None`` otherwise)."""

    path: Path
    model_index: dict[str, Any]
    identity: ModelIdentity
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None
    tokenizer: Any
    scheduler: Any
    image_encoder: nn.Module | None = None
    image_processor: Any = None

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
    path_or_id: str | Path,
    *,
    preset: str | WanPreset | None = None,
    resolver: ModelResolver | None = None,
) -> tuple[Path, ModelIdentity]:
    """Resolve a model (``resolver``: see :func:`resolve_model_path`) and read its identity
    from its JSON files and weight names only (fast: sizes and settings can be checked
    before any weight loads)."""
    path = resolve_model_path(path_or_id, resolver=resolver)
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
    resolver: ModelResolver | None = None,
    transformer_device: str | torch.device | None = None,
) -> WanComponents:
    """Load all components on the CPU (the caller moves them). Sampling defaults come from
    the folder's own files, then a known preset (given, or matched by name or
    architecture), then diffusers' defaults (:func:`fastwan.models.identity.identify`).
    ``transformer_device="meta"``: the transformer is built without weights, to be sharded
    and then filled (see :func:`load_transformer`)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    path, identity = identify_folder(path_or_id, preset=preset, resolver=resolver)
    transformer = load_transformer(
        path,
        dtype=dtype,
        device=transformer_device,
        attention=attention,
        sparsity=sparsity,
        tile_size=tile_size,
        backend=backend,
        strict=strict,
    )
    vae = load_vae(path / "vae", dtype=vae_dtype)
    text_encoder = UMT5EncoderModel.from_pretrained(str(path / "text_encoder"), dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    image_encoder = image_processor = None
    if transformer.config.get("image_dim") is not None:  # Wan2.1 I2V: CLIP image embeddings
        from fastwan.models.image_encoder import load_image_encoder

        image_encoder, image_processor = load_image_encoder(path, dtype=dtype)
    return WanComponents(
        image_encoder=image_encoder,
        image_processor=image_processor,
        path=path,
        model_index=read_model_index(path),
        identity=identity,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=load_scheduler(path),
    )
