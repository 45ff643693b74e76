"""The device mesh of a training run: ``replicate x shard x sequence_parallel`` ranks.

Rank layout (row-major, sequence-parallel innermost)::

    rank = (r * shard + s) * sequence_parallel + p

so the ``sequence_parallel`` ranks of one Ulysses group are consecutive (one node's GPUs
when ``sp <= gpus per node``), and data-parallel rank ``dp = rank // sequence_parallel``
(what :meth:`fastwan.data.sampler.DistributedSampler.for_rank` assumes).

* parameters are sharded (FSDP2) over ``shard x sequence_parallel`` ranks and replicated
  over ``replicate`` (HSDP when both are > 1): the ranks of an SP group hold the same
  weights, so they share the shard dimension, as in torchtitan's ``dp_shard_cp``;
* ranks of one SP group see the same samples, timesteps and noise: the training generator
  is seeded per *data-parallel* rank (:func:`data_parallel_seed`).

:func:`validate_layout` checks a layout before anything is built; :func:`init_parallel`
starts the process group from the ``torchrun`` environment (gloo on CPU, nccl on CUDA)
and returns a :class:`ParallelState`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fastwan.config import ParallelConfig

__all__ = [
    "MESH_DIMS",
    "ParallelState",
    "broadcast_from_main",
    "data_parallel_seed",
    "destroy_parallel",
    "init_parallel",
    "launch_env",
    "validate_layout",
]

MESH_DIMS = ("replicate", "shard", "sp")
_SEED_STRIDE = 1_000_003  # a prime: per-rank seeds of nearby base seeds do not collide
_SEED_MOD = 2**63


def data_parallel_seed(seed: int, dp_rank: int) -> int:
    """The training generator's seed on data-parallel rank ``dp_rank``.

    Rank 0 keeps ``seed`` (a one-process run equals data-parallel rank 0); every SP rank
    of a group gets its group's seed, so they draw the same timesteps and noise.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or dp_rank < 0:
        raise ValueError(f"dp_rank must be a non-negative int, got {dp_rank!r}")
    return (seed + _SEED_STRIDE * dp_rank) % _SEED_MOD


def launch_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the ``torchrun`` / SLURM-via-torchrun
    environment; ``(0, 0, 1)`` when it is not set (a plain one-process run)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(
            f"RANK / LOCAL_RANK / WORLD_SIZE must be integers (set by torchrun): {err}"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"inconsistent launch environment RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local}; launch with torchrun"
        )
    return rank, local, world


def validate_layout(
    parallel: ParallelConfig,
    *,
    world_size: int | None = None,
    num_heads: int | None = None,
) -> None:
    """Raise a ``ValueError`` naming the field and the fix unless the layout is runnable.

    Checks (all before any model is built): ``replicate x shard x sequence_parallel``
    equals ``parallel.world_size``; ``parallel.world_size`` equals the processes running
    (``world_size``, default: the ``WORLD_SIZE`` of torchrun, 1 without it); the model's
    attention heads (``num_heads``, when known) divide by ``sequence_parallel`` (Ulysses
    gives every SP rank ``heads / sp`` whole heads).
    """
    if not isinstance(parallel, ParallelConfig):
        raise ValueError(f"parallel must be a ParallelConfig, got {type(parallel).__name__}")
    p = parallel
    product = p.replicate * p.shard * p.sequence_parallel
    if product != p.world_size:  # ParallelConfig checks this too; re-check mutated configs
        raise ValueError(
            f"parallel.replicate x parallel.shard x parallel.sequence_parallel = "
            f"{p.replicate} x {p.shard} x {p.sequence_parallel} = {product} must equal "
            f"parallel.world_size ({p.world_size}); change replicate or shard so that the "
            "product is the number of GPUs"
        )
    have = launch_env()[2] if world_size is None else world_size
    if have != p.world_size:
        raise ValueError(
            f"parallel.world_size is {p.world_size} but {have} process(es) are running; "
            f"launch with `torchrun --nproc_per_node={p.world_size} ...` (or across nodes, "
            f"scripts/slurm/) or set --parallel.world_size={have} with "
            f"parallel.replicate x shard x sequence_parallel = {have}"
        )
    if num_heads is not None and num_heads % p.sequence_parallel:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"parallel.sequence_parallel ({p.sequence_parallel}) must divide the model's "
            f"{num_heads} attention heads (Ulysses splits heads across the SP group); use "
            f"one of {divisors}"
        )


@dataclass
class ParallelState:
    """Where this process sits in the mesh (see the module docstring for the layout)."""

    config: ParallelConfig
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None  # [replicate, shard, sp]; None in a one-process run
    fsdp_mesh: DeviceMesh | None  # [replicate, shard x sp]: where parameters live

    @property
    def sp_size(self) -> int:
        return self.config.sequence_parallel

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_size(self) -> int:
        return self.config.data_parallel_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes the run's shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The Ulysses group of this rank (None without sequence parallelism)."""
        if self.mesh is None or self.sp_size == 1:
            return None
        return self.mesh.get_group("sp")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_parallel(
    parallel: ParallelConfig,
    device: str | torch.device | None = None,
    *,
    num_heads: int | None = None,
) -> ParallelState:
    """Validate the layout, then (``world_size > 1``) start the process group from the
    torchrun environment and build the meshes. ``device``: ``cuda`` gives every process
    ``cuda:LOCAL_RANK`` and nccl; ``cpu`` gives gloo. Default: cuda when available."""
    rank, local_rank, world = launch_env()
    validate_layout(parallel, world_size=world, num_heads=num_heads)
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world == 1:
        return ParallelState(parallel, 0, 0, 1, dev, None, None)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    elif dist.get_world_size() != world:
        raise ValueError(
            f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {world}"
        )
    p = parallel
    mesh = init_device_mesh(
        dev.type, (p.replicate, p.shard, p.sequence_parallel), mesh_dim_names=MESH_DIMS
    )
    fsdp_mesh = init_device_mesh(
        dev.type, (p.replicate, p.shard * p.sequence_parallel), mesh_dim_names=("replicate", "fsdp")
    )
    return ParallelState(parallel, rank, local_rank, world, dev, mesh, fsdp_mesh)


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable value, e.g. a list of CPU tensors) on every rank;
    the object itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy_parallel(state: ParallelState | None = None) -> None:
    """Tear down the process group (end of a run or a test); no-op when none is running."""
    del state
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
