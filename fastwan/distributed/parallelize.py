"""FSDP2 wrapping of Wan transformers and the collectives the trainer needs.

:func:`shard_transformer` applies ``fully_shard`` to every Wan block and then to the root
(the patch / condition embedders, the output norm and projection), on the mesh
``[replicate, shard x sp]`` of :class:`fastwan.distributed.mesh.ParallelState`: plain FSDP
when ``replicate == 1``, HSDP (sharded within a group, replicated across groups) when both
dimensions are > 1, replication only (DDP-like) when ``shard x sp == 1``. On CUDA with
``train.mixed_precision: bf16`` parameters are gathered in bf16 and gradients reduced in
fp32 (``MixedPrecisionPolicy``); ``cpu_offload=True`` keeps the sharded parameters,
gradients and optimizer states in CPU memory (not a recipe field yet: the methods take
their device from their parameters, which offloading keeps on the CPU).

:func:`parallelize_method` does it for a method's networks: activation checkpointing on
the trainable ones first (so FSDP wraps the checkpointed blocks), per-block
``torch.compile`` when ``parallel.compile`` asks for it, then FSDP2 for the
student, the critic and the frozen teacher (sharded too; it has no gradients and no
optimizer), and last :func:`materialize` for networks built on the meta device
(``load_transformer(..., device="meta")``): each rank allocates and reads only its own
shards. The optimizers must be built after this (the parameters become DTensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from fastwan.distributed.activation_checkpoint import apply_activation_checkpointing
from fastwan.distributed.mesh import ParallelState
from fastwan.models.compile import compile_blocks
from fastwan.models.loading import load_pending_weights, pending_weights

if TYPE_CHECKING:  # the annotation only: distributed never imports methods at run time
    from fastwan.methods.base import Method

__all__ = [
    "DistributedValidator",
    "all_finite",
    "all_reduce_mean",
    "clip_grad_norm",
    "is_sharded",
    "materialize",
    "parallelize_method",
    "reshard",
    "set_gradient_sync",
    "shard_transformer",
]


def _blocks(net: nn.Module) -> nn.ModuleList:
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"expected a Wan transformer with a `blocks` ModuleList, got {type(net).__name__}"
        )
    return blocks


def is_sharded(net: nn.Module) -> bool:
    """Whether ``net`` was wrapped by ``fully_shard``."""
    return isinstance(net, FSDPModule)


def shard_transformer(
    net: nn.Module,
    state: ParallelState,
    *,
    mixed_precision: bool = False,
    cpu_offload: bool = False,
    trainable: bool = True,
) -> nn.Module:
    """``fully_shard`` each block of ``net``, then ``net`` itself (in place; returned).

    mixed_precision: bf16 parameters in forward/backward, fp32 gradient reduction (only
    applied on CUDA: bf16 matmuls on CPU are slow and tests compare fp32 numbers).
    cpu_offload: parameters, gradients and optimizer states live on the CPU between uses.
    trainable: ``False`` for a network that only runs forward (the frozen teacher): every
    block reshards right after its forward, as no backward will need it again.
    """
    if state.fsdp_mesh is None:
        raise ValueError(
            "shard_transformer needs a distributed ParallelState (world_size > 1); a "
            "one-process run trains the plain module"
        )
    mesh = state.fsdp_mesh
    if mesh["replicate"].size() == 1:
        mesh = mesh["fsdp"]  # plain FSDP: a 1-D mesh
    kwargs: dict = {"mesh": mesh}
    if mixed_precision and state.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    kwargs["offload_policy"] = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = _blocks(net)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keep them.
        keep = trainable and i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=not keep, **kwargs)
    fully_shard(net, **kwargs)
    return net


def parallelize_method(method: Method, state: ParallelState, recipe: object) -> None:
    """Activation checkpointing (``parallel.activation_checkpointing``) on the trainable
    networks, Ulysses sequence parallelism (``parallel.sequence_parallel > 1``), per-block
    ``torch.compile`` (``parallel.compile``) and FSDP2 on every network of ``method`` (a
    :class:`fastwan.methods.base.Method`: its ``networks()`` and ``frozen_networks()``; DMD:
    student, critic, teacher; flow: the trained network). A one-process state gets
    activation checkpointing and compilation only.

    With SP, each rank's gradients hold only its sequence shard's contribution: they must
    be summed over the SP group and averaged over data-parallel ranks, so the FSDP
    reduction (over ``replicate x shard x sp`` ranks) divides by the data-parallel size
    ``replicate x shard`` instead of by the number of ranks."""
    parallel = recipe.parallel  # type: ignore[attr-defined]
    trainable: Mapping[str, nn.Module] = method.networks()
    # A network shared by several roles (LoRA adapters on one base, which may also be the
    # frozen teacher) is wrapped and sharded once.
    unique = {id(net): net for net in trainable.values()}
    for net in unique.values():
        apply_activation_checkpointing(net, parallel.activation_checkpointing)
    nets = [(net, True) for net in unique.values()]
    for net in method.frozen_networks().values():
        if id(net) not in unique:
            unique[id(net)] = net
            nets.append((net, False))
    mixed = recipe.train.mixed_precision == "bf16"  # type: ignore[attr-defined]
    for net, is_trainable in nets:
        if state.sp_size > 1:  # > 1 only in a distributed run
            from fastwan.distributed.sequence_parallel import enable_sequence_parallel

            enable_sequence_parallel(net, state.sp_group)
        if parallel.compile != "none":  # per block, before FSDP wraps it (torchtitan)
            compile_blocks(net, backend=parallel.compile)
        if not state.distributed:
            continue
        shard_transformer(
            net,
            state,
            mixed_precision=mixed,
            cpu_offload=parallel.cpu_offload,
            trainable=is_trainable,
        )
        if state.sp_size > 1:
            for module in net.modules():  # every FSDP unit reduces its own gradients
                if isinstance(module, FSDPModule):
                    module.set_gradient_divide_factor(float(state.dp_size))
                    if state.device.type == "cpu":  # gloo has no PREMUL_SUM: sum, then divide
                        module.set_force_sum_reduction_for_comms(True)
    # Meta-built networks (and their copies) get their memory and weights now: each rank
    # only its own shards. Offloaded shards live on the CPU.
    for net, _ in nets:
        materialize(net, torch.device("cpu") if parallel.cpu_offload else state.device)
    if parallel.cpu_offload:
        # Offloaded shards live on the CPU; the method must still compute on the device.
        method.compute_device = state.device


def materialize(net: nn.Module, device: torch.device | str) -> bool:
    """Give a network built on the meta device (``load_transformer(..., device="meta")``,
    or a copy of one) its memory on ``device`` and its weights from its checkpoint
    (:func:`fastwan.models.loading.load_pending_weights`), after any wrapping: sharded by
    ``fully_shard``, each rank allocates and reads only its own shards. Buffers (the rotary
    tables, computed when the module was built) keep their values, on the mesh's device
    (where ``fully_shard`` put them), else on ``device``. Returns whether there was
    anything to do (False for a network that has its weights)."""
    if pending_weights(net) is None:
        return False
    buffers = [
        (module, name, buf)
        for module in net.modules()
        for name, buf in module._buffers.items()
        if buf is not None and not buf.is_meta
    ]
    device = torch.device(device)
    net.to_empty(device=device)
    for module, name, buf in buffers:  # to_empty left them uninitialised
        # fully_shard moved them to the mesh's device already (where they stay under CPU
        # offload); those of an unsharded network are still on the CPU
        module._buffers[name] = buf.to(device) if buf.device.type == "cpu" else buf
    load_pending_weights(net)
    return True


def reshard(net: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit of ``net``: after a no-grad forward
    the root (and a block kept for backward) still hold full plain tensors, and whatever
    reads ``named_parameters()`` next (EMA, validation, state dicts) must see the shards."""
    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def set_gradient_sync(net: nn.Module, enabled: bool) -> None:
    """Reduce gradients in this backward (``True``) or only accumulate them locally
    (``False``: the micro-steps of gradient accumulation before the last one)."""
    if isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(enabled)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm over all shards and ranks; returns the pre-clip norm."""
    params = list(params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def all_reduce_mean(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each value over all ranks (every rank must pass the same keys); the input
    itself when no process group is running."""
    if not values or not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, buf.tolist())}


def all_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank: all ranks get the same answer, so they
    raise together instead of leaving the others waiting in a collective."""
    ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)  # [1]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class DistributedValidator:
    """Runs a one-process validator (:class:`fastwan.train.validation.Validator`) in a
    multi-process run: every rank generates with the sharded generator (its forward needs
    the collectives of all ranks; SP ranks need the same inputs, which the prompts and
    seeds give), rank 0 alone writes the videos and returns the result."""

    def __init__(self, validator: Any, state: ParallelState) -> None:
        self.validator = validator
        self.state = state

    def __call__(self, trainer: Any) -> Any:
        net = trainer.networks["generator"]
        reshard(net)  # the EMA swap works on the shards
        ema = getattr(trainer, "ema", None)
        with ema.swapped_in(net) if ema is not None else nullcontext(net):
            if self.state.is_main:
                result = self.validator.run(net, trainer.step, trainer.output_dir)
            else:
                self.validator.generate(net)  # the same forwards, nothing written
                result = None
        # The no-grad forwards left gathered EMA weights in the root and the last block;
        # training must gather the live weights (restored into the shards) again.
        reshard(net)
        self.state.barrier()  # the files exist before any rank goes on
        return result
