"""Training checkpoints: one path for one and many processes, through
``torch.distributed.checkpoint`` (DCP).

A checkpoint ``<output_dir>/checkpoint-<step>`` (format version :data:`CHECKPOINT_VERSION`)::

    dcp/            DCP files (.metadata, __<rank>_0.distcp); the Stateful pieces:
                      model.<role>         every rank: its shards of the network (FQN keys)
                      optim.<role>         every rank: its shards of the AdamW states
                      ema.<role>           every rank: its shards of the float32 EMA shadows
                      trainer              rank 0: step, method, log history
                      lr_scheduler.<role>  rank 0: the LR schedules
                      data                 rank 0: the data position (data with state_dict)
                      rng.rank<R>          rank R: Python / NumPy / torch (CPU, CUDA) RNGs
                                           and the named training generators
    recipe.yaml     the recipe that trained up to this step (rank 0)
    checksums.json  sha256 and size of every file
    COMPLETE        the marker, written last: format, version, step, method, networks,
                    EMA, data, and the mesh layout it was saved with

One process is the same path without a process group. Saving is collective and atomic
(:mod:`fastwan.train.checkpoint_io`): rank 0 creates a temporary directory, every rank
writes its DCP shards into it, rank 0 adds ``recipe.yaml`` and commits (fsync, checksums,
marker, rename). A failure on any rank -- a full or read-only disk is named as such -- is
raised on every rank (none is left waiting at a barrier), and earlier checkpoints are
untouched.

Loading reshards: DCP reads whatever slices this rank's (sharded, replicated or plain)
tensors need, so a checkpoint saved by N processes resumes on M, in another layout
(``shard`` / ``replicate``) or in one process, and one process's resumes on N. When the
data-parallel size changes the data position is translated (:func:`reshard_sampler_state`),
and the generator of data-parallel rank ``d`` continues the saved stream of rank ``d``
when that rank existed (a fresh, seeded stream otherwise). On the same layout resuming is
exact: ``2k`` steps equal ``k`` steps + save + resume + ``k`` steps, bitwise.

Plain data (counters, history, schedules, positions, RNG states) is stored as one DCP
item per piece and read back with ``torch.load(weights_only=True)``: a long history is one
item, not thousands, a key a newer torch adds to a scheduler's state cannot break a load,
and no checkpoint file can run code.

Without a process group (``fastwan export``, tools): :func:`load_network_weights`
consolidates a network (or its EMA) into a plain module, :func:`read_trainer_state` and
:func:`read_rank_rng` read the plain pieces. A checkpoint of another format version -- the
safetensors + ``trainer_state.pt`` checkpoints of fastwan before version 2 among them -- is
refused with a message naming the version found and the fix (:func:`check_checkpoint`).
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fastwan.distributed.mesh import ParallelState, data_parallel_seed
from fastwan.fsutil import WriteError
from fastwan.train.checkpoint_io import (
    COMPLETE_MARKER,
    capture_rng_state,
    commit_checkpoint_dir,
    prepare_checkpoint_dir,
    restore_rng_state,
    save_error,
)
from fastwan.train.ema import EMA

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DCP_DIR",
    "CheckpointFormatError",
    "ModelState",
    "OptimizerState",
    "PlainState",
    "TrainingState",
    "check_checkpoint",
    "load_network_weights",
    "load_training_checkpoint",
    "read_marker",
    "read_rank_rng",
    "read_trainer_state",
    "reshard_sampler_state",
    "save_training_checkpoint",
]

CHECKPOINT_FORMAT = "fastwan-dcp"
CHECKPOINT_VERSION = 2  # 1: <role>.safetensors / dcp + trainer_state.pt + rng_rank<R>.pt
DCP_DIR = "dcp"
_V1_FILES = ("trainer_state.pt", "generator.safetensors", "rng_rank0.pt")


# ------------------------------------------------------------------ process group


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself without a process group)."""
    if not _dist_on():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_failure(local: str | None) -> str | None:
    """``"rank R: <error>"`` of the first rank whose ``local`` error is not None (every
    rank calls this; it synchronises them), or None when every rank succeeded."""
    if not _dist_on():
        return None if local is None else f"rank 0: {local}"
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local)
    for r, e in enumerate(errors):
        if e is not None:
            return f"rank {r}: {e}"
    return None


def _layout(parallel: ParallelState | None) -> dict[str, int]:
    if parallel is None:  # one process, or plain data parallelism over the process group
        world = dist.get_world_size() if _dist_on() else 1
        return {"world_size": world, "dp_size": world, "sequence_parallel": 1}
    return {
        "world_size": parallel.world_size,
        "dp_size": parallel.dp_size,
        "sequence_parallel": parallel.sp_size,
    }


# ------------------------------------------------------------------ Stateful pieces


def _encode(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _decode(blob: Any) -> Any:
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"expected a plain-data item, got {type(blob).__name__}")
    return torch.load(io.BytesIO(blob), weights_only=True)


class PlainState:
    """A Stateful of plain data (Python values, small tensors): ``get()`` is saved as one
    DCP item, ``load(value)`` receives it back. Only values that
    ``torch.load(weights_only=True)`` reads may be stored."""

    def __init__(self, get: Callable[[], Any], load: Callable[[Any], None]) -> None:
        self._get, self._load = get, load

    def state_dict(self) -> dict[str, Any]:
        return {"value": _encode(self._get())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load(_decode(state["value"]))


class ModelState:
    """A network as a Stateful: its (sharded or plain) parameters and buffers by FQN, or
    only the parameters ``names`` (a role that trains part of a network, e.g. its LoRA
    adapter on a frozen base the run loads from the model folder)."""

    def __init__(self, net: nn.Module, names: Collection[str] | None = None) -> None:
        self.net = net
        self.names = None if names is None else frozenset(names)

    def state_dict(self) -> dict[str, Any]:
        from fastwan.distributed.parallelize import reshard

        reshard(self.net)  # a no-grad forward may have left gathered parameters behind
        if self.names is None:
            return get_model_state_dict(self.net)
        options = StateDictOptions(ignore_frozen_params=True)
        state = get_model_state_dict(self.net, options=options)
        missing = sorted(self.names - set(state))
        if missing:
            raise ValueError(f"the network has no trainable parameters {missing[:3]} to save")
        return {k: v for k, v in state.items() if k in self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.names is None:
            set_model_state_dict(self.net, state)
        else:  # a part of the network: the rest is not in this piece
            set_model_state_dict(self.net, state, options=StateDictOptions(strict=False))


class OptimizerState:
    """An optimizer of ``net`` as a Stateful, keyed by parameter FQN (so it reshards).

    ``saved_keys`` (the checkpoint's DCP keys, on load) and ``prefix`` (this piece's key):
    a parameter whose state the checkpoint lacks (it never had a gradient, e.g. the dense
    critic's VSA gates) gets none after loading, as in the run that saved it."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        saved_keys: frozenset[str] | None = None,
        prefix: str = "",
    ) -> None:
        self.net, self.optimizer = net, optimizer
        self.saved_keys, self.prefix = saved_keys, prefix

    def state_dict(self) -> dict[str, Any]:
        fresh = not self.optimizer.state
        state = get_optimizer_state_dict(self.net, self.optimizer)
        if fresh and self.saved_keys is None:
            # saving before any update: DCP's helper created zero states (one step at lr 0);
            # drop them again so that the next real update starts as it would have
            self.optimizer.state.clear()
            state = {**state, "state": {}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        options = None
        if self.saved_keys is not None:
            kept = {}
            for fqn, entry in state.get("state", {}).items():
                names = [f"{self.prefix}.state.{fqn}.{k}" for k in entry]
                if any(n in self.saved_keys for n in names):
                    kept[fqn] = entry
            if len(kept) < len(state.get("state", {})):
                options = StateDictOptions(strict=False)  # those parameters get no state
            state = {**state, "state": kept}
        set_optimizer_state_dict(self.net, self.optimizer, state, options=options)


@dataclass
class TrainingState:
    """The live objects a training checkpoint saves and loads (in place).

    Attributes:
        networks: role -> trainable network (plain or FSDP2-wrapped).
        optimizers: role -> its optimizer (same roles).
        schedulers: role -> its LR scheduler (same roles).
        trainer: the loop's own counters (step, method, history): a :class:`PlainState`.
        generators: name -> ``torch.Generator`` restored with this rank's RNG states.
        ema: role -> :class:`~fastwan.train.ema.EMA` of that network.
        data: the training data; its position is saved when it has ``state_dict`` and
            restored when it has ``load_state_dict`` (e.g.
            :class:`~fastwan.data.sampler.ResumableLoader`).
        parameters: role -> the names of the parameters saved for that role, for a role
            that trains only part of its network (LoRA: its adapter on a frozen base, which
            may be shared with other roles); a role not listed saves its whole network.
    """

    networks: Mapping[str, nn.Module]
    optimizers: Mapping[str, torch.optim.Optimizer]
    schedulers: Mapping[str, Any]
    trainer: PlainState
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)
    ema: Mapping[str, EMA] = field(default_factory=dict)
    data: Any = None
    parameters: Mapping[str, Collection[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        roles = set(self.networks)
        extra = sorted(set(self.parameters) - roles)
        if extra:
            raise ValueError(f"parameters of {extra}, which are not networks {sorted(roles)}")
        for name, pieces in (("optimizers", self.optimizers), ("schedulers", self.schedulers)):
            if set(pieces) != roles:
                raise ValueError(
                    f"{name} has roles {sorted(pieces)} but networks {sorted(roles)}; pass one "
                    "per network"
                )
        extra = sorted(set(self.ema) - roles)
        if extra:
            raise ValueError(f"ema of {extra}, which are not networks {sorted(roles)}")


def _rng_key(rank: int) -> str:
    return f"rng.rank{rank}"


def _rng_piece(generators: Mapping[str, torch.Generator]) -> PlainState:
    gens = dict(generators)
    return PlainState(lambda: capture_rng_state(gens), lambda s: restore_rng_state(s, gens))


def _plain_piece(obj: Any) -> PlainState:
    return PlainState(obj.state_dict, obj.load_state_dict)


# ------------------------------------------------------------------------ reading


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but a plain-data item is first read with ``weights_only=True``
    (DCP itself unpickles them in full): no checkpoint file can run code on load."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        safe = io.BytesIO()
        torch.save(obj, safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


def _dcp_load(
    state: dict[str, Any], path: Path, *, partial: bool = False, alone: bool = False
) -> None:
    """``dcp.load`` in place, collectively (every rank calls it) or, without a process group
    or with ``alone``, in this process alone (DCP's warning about that is the expected case
    here: one-process resume, export)."""
    no_dist = alone or not _dist_on()
    planner = _SafeLoadPlanner(allow_partial_load=partial)
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, planner=planner, no_dist=no_dist)


def _saved_keys(path: Path) -> frozenset[str]:
    return frozenset(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


class CheckpointFormatError(ValueError):
    """A directory that is not a checkpoint this fastwan reads (another format version,
    not a training checkpoint); the message names what was found and the fix."""


def read_marker(path: str | Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker of ``path`` (JSON), or ``{}`` when it has none or it is
    unreadable (:func:`fastwan.train.checkpoint_io.verify_checkpoint` names why)."""
    try:
        marker = json.loads((Path(path) / COMPLETE_MARKER).read_bytes())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """The marker of ``path`` when it is a complete training checkpoint of format version
    :data:`CHECKPOINT_VERSION`, else :class:`CheckpointFormatError` naming the version it
    has and the fix. Reads only the marker (no tensors)."""
    path = Path(path)
    marker = read_marker(path)
    if not marker and (path / COMPLETE_MARKER).is_file():
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} is damaged: its {COMPLETE_MARKER} marker is unreadable "
            "or corrupted; resume from an earlier checkpoint-<step> (or --resume latest, "
            "which skips damaged ones)"
        )
    if not marker:
        if (path / DCP_DIR).is_dir() or any((path / f).is_file() for f in _V1_FILES):
            raise CheckpointFormatError(
                f"{str(path)!r} is not a complete checkpoint (no readable {COMPLETE_MARKER} "
                "marker: its save was interrupted); resume from an earlier checkpoint-<step> "
                "or --resume latest"
            )
        raise CheckpointFormatError(
            f"{str(path)!r} is not a trainer checkpoint (no {DCP_DIR}/ nor {COMPLETE_MARKER}); "
            "pass a checkpoint-<step> directory written by Trainer.save_checkpoint "
            "(fastwan distill / finetune)"
        )
    version = marker.get("version")
    if version is None:  # written before versions existed: safetensors or dcp/ + .pt files
        version = 1
    if marker.get("format", CHECKPOINT_FORMAT) not in (CHECKPOINT_FORMAT, "dcp") or not (
        isinstance(version, int) and not isinstance(version, bool)
    ):
        raise CheckpointFormatError(
            f"{str(path)!r} is not a fastwan training checkpoint (its {COMPLETE_MARKER} says "
            f"format {marker.get('format')!r}, version {version!r}); pass a checkpoint-<step> "
            "directory written by fastwan distill / finetune"
        )
    if version < CHECKPOINT_VERSION:
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} has checkpoint format version {version} (networks in "
            "<role>.safetensors or dcp/ beside trainer_state.pt and rng_rank<R>.pt files, "
            "written by fastwan before version 2); this fastwan reads version "
            f"{CHECKPOINT_VERSION} only (every piece in {DCP_DIR}/). Finish or export that run "
            "with the fastwan that wrote it (fastwan export CHECKPOINT --out DIR), then start "
            "a new run from the exported folder (model.student_path=DIR)"
        )
    if version > CHECKPOINT_VERSION:
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} has checkpoint format version {version}, newer than "
            f"this fastwan's {CHECKPOINT_VERSION}; upgrade fastwan to load it"
        )
    return marker


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The plain pieces saved in ``path``, read in this process alone (no process group
    needed; e.g. to plot a run's losses): the loop's counters (``step``, ``method``,
    ``history``), ``schedulers`` (role -> LR scheduler state) and ``data`` (the data
    position, or None)."""
    path = Path(path)
    marker = check_checkpoint(path)
    keys = ["trainer", *(f"lr_scheduler.{r}" for r in marker.get("networks", []))]
    if marker.get("data"):
        keys.append("data")
    box = {k: {"value": b""} for k in keys}
    _dcp_load(box, path / DCP_DIR, alone=True)
    out = dict(_decode(box["trainer"]["value"]))
    out["schedulers"] = {
        k.split(".", 1)[1]: _decode(v["value"])
        for k, v in box.items()
        if k.startswith("lr_scheduler.")
    }
    out["data"] = _decode(box["data"]["value"]) if "data" in box else None
    return out


def read_rank_rng(path: str | Path, rank: int) -> dict[str, Any]:
    """The RNG states rank ``rank`` saved in ``path`` (see
    :func:`fastwan.train.checkpoint_io.capture_rng_state`), in this process alone."""
    path = Path(path)
    marker = check_checkpoint(path)
    world = int(marker["layout"]["world_size"])
    if not 0 <= rank < world:
        raise ValueError(f"{str(path)!r} was saved by {world} rank(s); rank {rank} is not one")
    box = {_rng_key(rank): {"value": b""}}
    _dcp_load(box, path / DCP_DIR, alone=True)
    return _decode(box[_rng_key(rank)]["value"])


def load_network_weights(
    path: str | Path,
    role: str,
    module: nn.Module,
    *,
    ema: bool = False,
    names: Collection[str] | None = None,
) -> None:
    """Consolidate network ``role`` (or its EMA, ``ema=True``) of the checkpoint ``path``,
    saved by any number of processes, into the plain ``module`` (full tensors, one process,
    no process group needed; ``fastwan export``). ``names``: read only these parameters
    (a role saved in part, e.g. a LoRA adapter; the EMA holds the parameters of
    ``module`` that require grad)."""
    path = Path(path)
    marker = check_checkpoint(path)
    if role not in marker.get("networks", []):
        raise ValueError(
            f"{str(path)!r} has no {role} network (it has {marker.get('networks')}); pass one "
            "of those"
        )
    if ema:
        if role not in marker.get("ema", []):
            raise ValueError(
                f"{str(path)!r} has no EMA of the {role} (train.ema_decay was null); export "
                "without --ema"
            )
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        shadow = {
            n: torch.empty(p.shape, dtype=torch.promote_types(p.dtype, torch.float32))
            for n, p in params.items()
        }
        try:
            _dcp_load({f"ema.{role}": {"shadow": shadow}}, path / DCP_DIR, alone=True)
        except Exception as err:  # DCP raises RuntimeError / CheckpointException on a mismatch
            raise ValueError(
                f"the {role} EMA of {str(path)!r} does not match this transformer ({err}); "
                "pass --model with the folder the run trained from"
            ) from None
        with torch.no_grad():
            for name, value in shadow.items():
                params[name].copy_(value.to(params[name].dtype))
        return
    weights = {
        k: v.detach().clone() for k, v in module.state_dict().items() if names is None or k in names
    }
    absent = sorted(set(names or ()) - set(weights))
    if absent:
        raise ValueError(f"the module has no parameters {absent[:3]} to read the {role} into")
    try:
        _dcp_load({f"model.{role}": weights}, path / DCP_DIR, alone=True)
    except Exception as err:  # DCP raises RuntimeError / CheckpointException on a mismatch
        raise ValueError(
            f"the {role} weights of {str(path)!r} do not match this transformer ({err}); "
            "pass --model with the folder the run trained from"
        ) from None
    module.load_state_dict(weights, strict=names is None)


# ------------------------------------------------------------------------- saving


def _save_pieces(state: TrainingState, rank: int) -> dict[str, Any]:
    """This rank's Stateful pieces (the tensors: every rank; plain data: rank 0; its own
    RNG: every rank)."""
    pieces: dict[str, Any] = {}
    for role, net in state.networks.items():
        pieces[f"model.{role}"] = ModelState(net, state.parameters.get(role))
        pieces[f"optim.{role}"] = OptimizerState(net, state.optimizers[role])
    for role, ema in state.ema.items():
        pieces[f"ema.{role}"] = ema
    if rank == 0:
        pieces["trainer"] = state.trainer
        for role, sched in state.schedulers.items():
            pieces[f"lr_scheduler.{role}"] = _plain_piece(sched)
        if hasattr(state.data, "state_dict"):
            pieces["data"] = _plain_piece(state.data)
    pieces[_rng_key(rank)] = _rng_piece(state.generators)
    return pieces


def save_training_checkpoint(
    final_dir: str | Path,
    state: TrainingState,
    *,
    parallel: ParallelState | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Atomically write the training checkpoint ``final_dir`` (every rank calls this; one
    process without a process group is the same path). ``metadata`` (JSON; e.g. step and
    method) goes into the marker with the format version, the layout and the pieces;
    ``extra_files``: name -> writer of that file (called on rank 0 with its path, e.g.
    ``recipe.yaml``). Returns ``final_dir``; raises on every rank when any rank failed."""
    final = Path(final_dir)
    rank = _rank()
    # Every failure is agreed on by all ranks before anyone waits for the others: a rank
    # that raised alone (rank 0's disk full or read-only) would leave the rest hung.
    own: list[BaseException] = []  # this rank's error: (clear error, original)

    def fail(err: BaseException, where: Path) -> str:
        cause, origin = err, ""
        if isinstance(err, CheckpointException) and err.failures:
            # DCP hands every rank the failing ranks' errors: describe the first one
            r, (cause, _trace) = min(err.failures.items(), key=lambda kv: kv[0])
            origin = f" (on rank {r}, in torch.distributed.checkpoint)"
        clear = save_error(cause, final, where)  # before the partial files are removed
        if clear is not None and origin:
            clear = WriteError(f"{clear}{origin}", clear.errno)
        own[:] = [clear or err, err]
        return str(clear or f"{type(cause).__name__}: {cause}{origin}")

    box: list[Any] = [None, None]  # rank 0's temporary directory, or its error
    if rank == 0:
        try:
            box[0] = str(prepare_checkpoint_dir(final))
        except Exception as err:
            box[1] = f"rank 0: {fail(err, final.parent)}"
    box = _broadcast(box)
    failed, tmp = box[1], Path(box[0] or final)
    if failed is None:
        local = None
        try:  # the pieces' state dicts, before DCP's collectives
            tensors = {k: v.state_dict() for k, v in _save_pieces(state, rank).items()}
        except Exception as err:
            local = fail(err, tmp)
        failed = _first_failure(local)
    if failed is None:
        local = None
        try:
            with warnings.catch_warnings():  # one process: saving alone is the intent
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(tensors, checkpoint_id=tmp / DCP_DIR, no_dist=not _dist_on())
        except (Exception, CheckpointException) as err:  # the latter is a BaseException
            local = fail(err, tmp)
        failed = _first_failure(local)  # the barrier: every rank's files are in tmp
    if failed is None and rank == 0:
        marker = {
            **dict(metadata or {}),
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "layout": _layout(parallel),
            "networks": sorted(state.networks),
            "ema": sorted(state.ema),
            "data": hasattr(state.data, "state_dict"),
        }
        try:
            for name, write in (extra_files or {}).items():
                write(tmp / name)
            commit_checkpoint_dir(tmp, final, marker)
        except Exception as err:
            failed = f"rank 0: {fail(err, tmp)}"
    failed = _broadcast(failed)  # rank 0's commit: no rank returns before it is complete
    if failed is None:
        return final
    if rank == 0 and box[0] is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if own:  # this rank's own error, made clear where it is a full / read-only disk
        clear, original = own
        if clear is original:
            raise original
        raise clear from original
    raise WriteError(f"saving checkpoint {str(final)!r} failed on {failed}")


# ------------------------------------------------------------------------ loading


def reshard_sampler_state(state: Mapping[str, Any], dp_size: int) -> dict[str, Any]:
    """A :class:`~fastwan.data.sampler.DistributedSampler` state saved with a different
    data-parallel size, translated to ``dp_size``: the same number of samples consumed
    globally in the epoch (``position x dp_size``), so the run continues with the samples
    an unchanged mesh would have used next."""
    state = dict(state)
    old = int(state["dp_size"])
    if old == dp_size:
        return state
    consumed = int(state["position"]) * old
    batch = int(state["batch_size"])
    if consumed % (dp_size * batch):
        raise ValueError(
            f"the checkpoint's data position ({consumed} samples of epoch {state['epoch']} "
            f"with data-parallel size {old}) is not a whole number of global batches of the "
            f"new data-parallel size {dp_size} x micro batch {batch}; resume with "
            f"parallel.replicate x parallel.shard = {old} or one dividing the position"
        )
    state["position"] = consumed // dp_size
    state["dp_size"] = dp_size
    return state


def _load_data(data: Any, saved: Any) -> None:
    dp_size = getattr(getattr(data, "sampler", None), "dp_size", None)
    if isinstance(dp_size, int) and isinstance(saved, Mapping) and "dp_size" in saved:
        saved = reshard_sampler_state(saved, dp_size)
    data.load_state_dict(saved)


def _rng_source(
    marker: Mapping[str, Any], parallel: ParallelState | None, path: Path
) -> int | None:
    """The saved rank whose RNG states this rank continues: itself on the same layout, else
    the first saved rank of its data-parallel rank; None (with a warning) when the saved
    run had no such data-parallel rank."""
    saved = marker["layout"]
    rank = parallel.rank if parallel is not None else 0
    dp_rank = parallel.dp_rank if parallel is not None else 0
    if dict(saved) == _layout(parallel):
        return rank
    if dp_rank < int(saved["dp_size"]):
        return dp_rank * int(saved["sequence_parallel"])
    warnings.warn(
        f"data-parallel rank {dp_rank} did not exist in the run that saved {str(path)!r} "
        f"({saved['dp_size']} data-parallel ranks): its random stream starts fresh, so this "
        "run's noise differs from an unchanged mesh's",
        stacklevel=3,
    )
    return None


def load_training_checkpoint(
    path: str | Path,
    state: TrainingState,
    *,
    parallel: ParallelState | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Load the checkpoint ``path`` into ``state``'s live objects on any mesh or one
    process (every rank calls this); returns its marker. ``seed``: a data-parallel rank
    the saved run did not have seeds its generators from (``seed``, step, its rank).

    Checked first (nothing loads on a mismatch): the format version, the networks and the
    EMAs. The caller checks the method, the step and the recipe against its own."""
    path = Path(path)
    marker = check_checkpoint(path)
    saved_nets, saved_ema = sorted(marker.get("networks", [])), sorted(marker.get("ema", []))
    if saved_nets != sorted(state.networks):
        raise ValueError(
            f"checkpoint {str(path)!r} holds the networks {saved_nets} but this run trains "
            f"{sorted(state.networks)}; resume it with the method and recipe that saved it"
        )
    if saved_ema != sorted(state.ema):
        raise ValueError(
            f"checkpoint {str(path)!r} {'has' if saved_ema else 'lacks'} an EMA (of "
            f"{saved_ema or 'no network'}) but this run's train.ema_decay "
            f"{'is set' if state.ema else 'is null'}; resume with the saved run's ema_decay"
        )
    store = path / DCP_DIR
    keys = _saved_keys(store)
    # Optimizers first and partially: a parameter that never had a gradient has no saved
    # state (DCP's helper creates one for every parameter, with a step at lr 0, which the
    # networks loaded next overwrite anyway).
    optims = {
        f"optim.{role}": OptimizerState(
            net, state.optimizers[role], saved_keys=keys, prefix=f"optim.{role}"
        )
        for role, net in state.networks.items()
    }
    _dcp_load(optims, store, partial=True)
    pieces: dict[str, Any] = {
        f"model.{r}": ModelState(n, state.parameters.get(r)) for r, n in state.networks.items()
    }
    pieces.update({f"ema.{role}": ema for role, ema in state.ema.items()})
    pieces["trainer"] = state.trainer
    for role, sched in state.schedulers.items():
        pieces[f"lr_scheduler.{role}"] = _plain_piece(sched)
    if marker.get("data"):
        if hasattr(state.data, "load_state_dict"):
            pieces["data"] = PlainState(state.data.state_dict, lambda s: _load_data(state.data, s))
        else:
            warnings.warn(
                "the checkpoint holds a data position but this data has no load_state_dict: "
                "the resumed run will not see the same batches",
                stacklevel=2,
            )
    source = _rng_source(marker, parallel, path)
    if source is not None:
        pieces[_rng_key(source)] = _rng_piece(state.generators)
    _dcp_load(pieces, store)  # the pieces' load_state_dict run in this order; RNG last
    if source is None:
        dp_rank = parallel.dp_rank if parallel is not None else 0
        fresh = data_parallel_seed((seed + int(marker.get("step", 0))) % 2**62, dp_rank)
        for gen in state.generators.values():
            gen.manual_seed(fresh)
    return marker
