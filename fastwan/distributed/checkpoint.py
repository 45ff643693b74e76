"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint ``<output_dir>/checkpoint-<step>`` holds::

    dcp/                 DCP files: every rank writes its own shards (and .metadata)
                         model.<role>   networks (get_model_state_dict: FQN keys)
                         optim.<role>   AdamW states (get_optimizer_state_dict)
                         ema.generator  the generator's EMA shadows (when train.ema_decay)
    trainer_state.pt     rank 0: step, method, LR schedulers, log history, EMA counters,
                         data position, the mesh it was saved with; "format": "dcp"
    rng_rank<R>.pt       every rank: Python / NumPy / torch RNGs and the training generator
    COMPLETE             the marker, written last (fastwan.train.checkpoint_io)

Saving is atomic like :mod:`fastwan.train.checkpoint_io`: rank 0 creates a temporary
directory, all ranks write into it, rank 0 commits (fsync, marker, rename) after a barrier.

Loading reshards: DCP reads whatever slices this rank's (sharded or plain) tensors need,
so a checkpoint saved by 2 processes resumes with 1, 2 or more, and
:func:`load_network_weights` reads a consolidated network (or its EMA) into a plain
module without any process group (``fastwan export``). When the data-parallel size
changes, the sampler position is translated (:func:`reshard_sampler_state`); the training
generator of data-parallel rank ``d`` continues the saved stream of rank ``d`` when that
rank existed.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fastwan.distributed.mesh import ParallelState, data_parallel_seed
from fastwan.fsutil import WriteError
from fastwan.train.checkpoint_io import (
    _save_failed,
    capture_rng_state,
    commit_checkpoint_dir,
    prepare_checkpoint_dir,
    restore_rng_state,
)
from fastwan.train.ema import EMA

__all__ = [
    "SHARDED_DIR",
    "STATE_FILE",
    "is_sharded_checkpoint",
    "load_network_weights",
    "load_sharded_checkpoint",
    "reshard_sampler_state",
    "restore_rank_rng",
    "resume_trainer_checkpoint",
    "resume_trainer_from_full",
    "rng_file",
    "save_sharded_checkpoint",
    "save_trainer_checkpoint",
]

SHARDED_DIR = "dcp"
STATE_FILE = "trainer_state.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _dcp_load(state: dict[str, Any], path: Path, *, partial: bool = False) -> None:
    """``dcp.load`` in place; without a process group it reads in this process alone (DCP's
    warning about that is the expected case here: one-process resume, export)."""
    no_dist = not _dist_on()
    planner = DefaultLoadPlanner(allow_partial_load=partial)
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, planner=planner, no_dist=no_dist)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a DCP checkpoint (its ``dcp/.metadata``)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def _tensor_state(
    networks: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None,
    ema: EMA | None,
) -> dict[str, Any]:
    from fastwan.distributed.parallelize import reshard

    state: dict[str, Any] = {}
    for role, net in networks.items():
        reshard(net)  # a no-grad forward may have left gathered parameters behind
        state[f"model.{role}"] = get_model_state_dict(net)
        if optimizers is not None:
            state[f"optim.{role}"] = get_optimizer_state_dict(net, optimizers[role])
    if ema is not None:
        state["ema.generator"] = ema.shadow  # loaded in place
    return state


def save_sharded_checkpoint(
    final_dir: str | Path,
    *,
    networks: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    ema: EMA | None,
    trainer_state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator],
    parallel: ParallelState | None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Collectively write a sharded checkpoint to ``final_dir`` (every rank calls this).

    ``trainer_state`` (plain data; rank 0's is written) gets ``format`` and the mesh added.
    """
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
        clear = _save_failed(cause, final, where)  # before the partial files are removed
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
    if _dist_on():
        dist.broadcast_object_list(box, src=0)
    failed, tmp = box[1], Path(box[0] or final)
    if failed is None:
        local = None
        try:
            dcp.save(
                _tensor_state(networks, optimizers, ema),
                checkpoint_id=tmp / SHARDED_DIR,
                no_dist=not _dist_on(),
            )
            torch.save(capture_rng_state(dict(generators)), tmp / rng_file(rank))
        except (Exception, CheckpointException) as err:  # the latter is a BaseException
            local = fail(err, tmp)
        failed = _first_failure(local)  # the barrier: every rank's files are in tmp
    if failed is None and rank == 0:
        try:
            state = dict(trainer_state)
            state["format"] = "dcp"
            state["layout"] = _layout(parallel)
            torch.save(state, tmp / STATE_FILE)
            commit_checkpoint_dir(tmp, final, {**dict(metadata or {}), "format": "dcp"})
        except Exception as err:
            failed = f"rank 0: {fail(err, tmp)}"
    if _dist_on():  # rank 0's commit: no rank returns before the checkpoint is complete
        result = [failed]
        dist.broadcast_object_list(result, src=0)
        failed = result[0]
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


def _first_failure(local: str | None) -> str | None:
    """``"rank R: <error>"`` of the first rank whose ``local`` error is not None (all ranks
    call this; it synchronises them), or None when every rank succeeded."""
    if not _dist_on():
        return None if local is None else f"rank 0: {local}"
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local)
    for r, e in enumerate(errors):
        if e is not None:
            return f"rank {r}: {e}"
    return None


def _layout(parallel: ParallelState | None) -> dict[str, int]:
    if parallel is None:
        return {"world_size": 1, "dp_size": 1, "sequence_parallel": 1}
    return {
        "world_size": parallel.world_size,
        "dp_size": parallel.dp_size,
        "sequence_parallel": parallel.sp_size,
    }


def load_sharded_checkpoint(
    path: str | Path,
    *,
    networks: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    ema: EMA | None,
) -> dict[str, Any]:
    """Load networks, optimizers and EMA of a sharded checkpoint into this rank's (sharded
    or plain) objects; returns the saved ``trainer_state`` for the caller to apply."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{str(path)!r} is not a sharded checkpoint (no {SHARDED_DIR}/.metadata)")
    state = torch.load(path / STATE_FILE, weights_only=True)
    if (state.get("ema") is None) != (ema is None):
        raise ValueError(
            f"checkpoint {str(path)!r} {'lacks' if state.get('ema') is None else 'has'} an EMA "
            "but this run's train.ema_decay "
            f"{'is set' if ema is not None else 'is null'}; resume with the saved run's ema_decay"
        )
    tensors = _tensor_state(networks, optimizers, ema)
    models = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    optims = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    _dcp_load(models, path / SHARDED_DIR)
    # A parameter that never had a gradient (e.g. the dense critic's unused VSA gates) has
    # no AdamW state in the checkpoint, but get_optimizer_state_dict creates one for every
    # parameter: those keep their fresh (zero) state, which AdamW skips while grad is None.
    _dcp_load(optims, path / SHARDED_DIR, partial=True)
    for role, net in networks.items():
        set_model_state_dict(net, tensors[f"model.{role}"])
        set_optimizer_state_dict(net, optimizers[role], tensors[f"optim.{role}"])
    return state


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


def restore_rank_rng(
    path: str | Path,
    saved_layout: Mapping[str, int],
    parallel: ParallelState | None,
    generators: Mapping[str, torch.Generator],
    *,
    seed: int,
    step: int,
) -> None:
    """Restore this rank's RNG states from ``path``.

    Same mesh: this rank's own file. Another mesh: the file of the first saved rank of the
    same data-parallel rank (its training generator continues that rank's stream); a
    data-parallel rank the saved run did not have starts a fresh stream seeded from
    (``seed``, ``step``, rank) with a warning.
    """
    path = Path(path)
    rank = parallel.rank if parallel is not None else 0
    dp_rank = parallel.dp_rank if parallel is not None else 0
    same = dict(saved_layout) == _layout(parallel)
    source = rank if same else dp_rank * int(saved_layout.get("sequence_parallel", 1))
    file = path / rng_file(source)
    if dp_rank < int(saved_layout.get("dp_size", 1)) and file.is_file():
        restore_rng_state(torch.load(file, weights_only=True), dict(generators))
        return
    if same:
        raise ValueError(f"checkpoint {str(path)!r} lacks {file.name}; it is incomplete")
    warnings.warn(
        f"data-parallel rank {dp_rank} did not exist in the saved run "
        f"({saved_layout.get('dp_size')} data-parallel ranks): its random stream starts "
        "fresh, so this run's noise differs from an unchanged mesh's",
        stacklevel=2,
    )
    fresh = data_parallel_seed((seed + step) % 2**62, dp_rank)
    for gen in generators.values():
        gen.manual_seed(fresh)


def load_network_weights(
    path: str | Path, role: str, module: nn.Module, *, ema: bool = False
) -> None:
    """Consolidate network ``role`` (or its EMA, ``ema=True``) of a sharded checkpoint into
    the plain ``module`` (full tensors, one process, no process group needed)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{str(path)!r} is not a sharded checkpoint (no {SHARDED_DIR}/.metadata)")
    if ema:
        state = torch.load(path / STATE_FILE, weights_only=True)
        if state.get("ema") is None or role != "generator":
            raise ValueError(
                f"{str(path)!r} has no EMA of the {role} (train.ema_decay was null); export "
                "without --ema"
            )
        shadow = {
            n: torch.empty(p.shape, dtype=torch.promote_types(p.dtype, torch.float32))
            for n, p in module.named_parameters()
            if p.requires_grad
        }
        _dcp_load({"ema.generator": shadow}, path / SHARDED_DIR)
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in shadow.items():
                params[name].copy_(value.to(params[name].dtype))
        return
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        _dcp_load({f"model.{role}": weights}, path / SHARDED_DIR)
    except Exception as err:  # DCP raises RuntimeError / CheckpointException on key mismatch
        raise ValueError(
            f"the {role} weights of {str(path)!r} do not match this transformer ({err}); "
            "pass --model with the folder the run trained from"
        ) from None
    module.load_state_dict(weights)


# ------------------------------------------------------------------- the trainer's side


def save_trainer_checkpoint(trainer: Any, generator_name: str = "train") -> Path:
    """Collectively save a :class:`~fastwan.train.trainer.Trainer` (every rank calls this)
    to ``<output_dir>/checkpoint-<step>``; rank 0 prunes to ``checkpoints_total_limit``."""
    from fastwan.train.checkpoint_io import checkpoint_dir, prune_checkpoints

    ema = trainer.ema
    data = trainer.data
    trainer_state = {
        "method": trainer.method.name,
        "step": trainer.step,
        "schedulers": {r: s.state_dict() for r, s in trainer.schedulers.items()},
        "history": trainer.history,
        "ema": {"decay": ema.decay, "num_updates": ema.num_updates} if ema is not None else None,
        "data": data.state_dict() if hasattr(data, "state_dict") else None,
    }
    path = save_sharded_checkpoint(
        checkpoint_dir(trainer.output_dir, trainer.step),
        networks=trainer.networks,
        optimizers=trainer.optimizers,
        ema=ema,
        trainer_state=trainer_state,
        generators={generator_name: trainer.generator},
        parallel=trainer.parallel,
        metadata={"step": trainer.step, "method": trainer.method.name},
    )
    limit = trainer.recipe.train.checkpoints_total_limit
    if limit is not None and _rank() == 0:
        prune_checkpoints(trainer.output_dir, limit)
    _barrier()
    return path


def resume_trainer_checkpoint(
    trainer: Any, path: str | Path, generator_name: str = "train"
) -> None:
    """Load a sharded checkpoint into a Trainer of any mesh (or one process): networks,
    optimizers, EMA, schedulers, step, history, data position, RNG. The caller has checked
    the method and the step against the recipe."""
    state = load_sharded_checkpoint(
        path, networks=trainer.networks, optimizers=trainer.optimizers, ema=trainer.ema
    )
    for role, sched in trainer.schedulers.items():
        sched.load_state_dict(state["schedulers"][role])
    if trainer.ema is not None:
        trainer.ema.decay = float(state["ema"]["decay"])
        trainer.ema.num_updates = int(state["ema"]["num_updates"])
    trainer.step = int(state["step"])
    trainer.history = list(state["history"])
    saved = state["data"]
    if saved is not None:
        if hasattr(trainer.data, "load_state_dict"):
            sampler = getattr(trainer.data, "sampler", None)
            dp_size = getattr(sampler, "dp_size", None)
            if isinstance(dp_size, int) and "dp_size" in saved:
                saved = reshard_sampler_state(saved, dp_size)
            trainer.data.load_state_dict(saved)
        else:
            warnings.warn(
                "the checkpoint holds a data position but this data has no load_state_dict: "
                "the resumed run will not see the same batches",
                stacklevel=2,
            )
    trainer._data_iter = None
    restore_rank_rng(
        path,
        state["layout"],
        trainer.parallel,
        {generator_name: trainer.generator},
        seed=trainer.recipe.train.seed,
        step=trainer.step,
    )
    trainer.method.set_step(trainer.step)


def resume_trainer_from_full(
    trainer: Any, path: str | Path, state: Mapping[str, Any], generator_name: str = "train"
) -> None:
    """Load a ONE-process checkpoint (``<role>.safetensors`` + ``trainer_state.pt`` +
    ``rng_rank0.pt``) into a multi-process Trainer: every rank reads the full tensors and
    keeps its shards (networks, AdamW states, EMA); the data position is translated to
    this mesh; data-parallel rank 0 continues the saved random stream, the others start
    fresh ones (with a warning). ``state`` is the loaded ``trainer_state.pt``."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.tensor import DTensor, distribute_tensor

    path = Path(path)
    full = StateDictOptions(full_state_dict=True)
    for role, net in trainer.networks.items():
        set_model_state_dict(net, load_file(str(path / f"{role}.safetensors")), options=full)
        # torch's optimizer state is keyed by position in the param list the Trainer built
        # ([p for p in net.parameters() if p.requires_grad]); DCP's helpers key it by name.
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        saved = state["optimizers"][role]
        by_name = {
            "state": {names[i]: s for i, s in saved["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]
            ],
        }
        # never-updated parameters (the dense critic's VSA gates) have no saved state
        lenient = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(net, trainer.optimizers[role], by_name, options=lenient)
        trainer.schedulers[role].load_state_dict(state["schedulers"][role])
    if (state["ema"] is None) != (trainer.ema is None):
        raise ValueError(
            f"checkpoint {str(path)!r} {'lacks' if state['ema'] is None else 'has'} an EMA "
            "but this run's train.ema_decay "
            f"{'is set' if trainer.ema is not None else 'is null'}; resume with the saved "
            "run's ema_decay"
        )
    if trainer.ema is not None:
        with torch.no_grad():
            for name, shadow in trainer.ema.shadow.items():
                value = state["ema"]["shadow"][name].to(shadow.device, shadow.dtype)
                if isinstance(shadow, DTensor):  # keep this rank's shard of the full tensor
                    value = distribute_tensor(value, shadow.device_mesh, shadow.placements)
                shadow.copy_(value)
        trainer.ema.decay = float(state["ema"]["decay"])
        trainer.ema.num_updates = int(state["ema"]["num_updates"])
    trainer.step = int(state["step"])
    trainer.history = list(state["history"])
    saved_data = state["data"]
    if saved_data is not None and hasattr(trainer.data, "load_state_dict"):
        dp_size = getattr(getattr(trainer.data, "sampler", None), "dp_size", None)
        if isinstance(dp_size, int) and "dp_size" in saved_data:
            saved_data = reshard_sampler_state(saved_data, dp_size)
        trainer.data.load_state_dict(saved_data)
    trainer._data_iter = None
    restore_rank_rng(
        path,
        _layout(None),
        trainer.parallel,
        {generator_name: trainer.generator},
        seed=trainer.recipe.train.seed,
        step=trainer.step,
    )
    trainer.method.set_step(trainer.step)
