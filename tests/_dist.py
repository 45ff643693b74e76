"""Helpers of the multi-process tests: start N gloo processes, the tiny DMD setup they
train, and a one-process emulation of N data-parallel ranks for the reference runs.

The tiny setup: a 2-block Wan (dim 32, 2 heads) teacher; random latents ``[16, 2, 8, 8]``
(token grid (2, 4, 4)) with random text embeddings; a VSA student (tile (1, 2, 2),
sparsity 0.5); fp32 on the CPU. Rank ``r`` of a data-parallel world of size ``D`` reads
the samples :class:`fastwan.data.sampler.DistributedSampler` gives data-parallel rank ``r``
and seeds its generator with :func:`fastwan.distributed.mesh.data_parallel_seed`.

:class:`EmulatedRanks` + :func:`interleaved_loader` make one process compute what ``D``
ranks compute together: micro-batch ``i`` of a step is rank ``i``'s batch, drawn with rank
``i``'s generator, and the trainer's accumulation (``D`` micro-batches, mean of the
losses) equals FSDP's mean of the ranks' gradients.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM, RandomSamples, collate_tensors

from fastwan.config import (
    DMDConfig,
    ModelConfig,
    OptimConfig,
    OptimConfigs,
    ParallelConfig,
    Recipe,
    TrainConfig,
    VSAConfig,
)
from fastwan.data.sampler import DistributedSampler, ResumableLoader
from fastwan.distributed.mesh import data_parallel_seed

LATENT = (16, 2, 8, 8)  # C, T, H, W
NUM_SAMPLES = 8
DATA_SEED = 3


# ------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    # The torchrun environment, so the code under test starts its own process group.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)  # two processes share the test machine's cores
    fn(*args)


def spawn(fn: Callable, world: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``world`` fresh processes with a torchrun-like environment
    (raises if any of them fails)."""
    mp.start_processes(
        _entry, args=(fn, world, free_port(), args), nprocs=world, start_method="spawn"
    )


# ------------------------------------------------------------------------ tiny setup


def rank_loader(dp_rank: int, dp_size: int) -> ResumableLoader:
    ds = RandomSamples(NUM_SAMPLES, latent=LATENT)
    sampler = DistributedSampler(
        len(ds), batch_size=1, dp_rank=dp_rank, dp_size=dp_size, seed=DATA_SEED
    )
    return ResumableLoader(ds, sampler, collate_fn=collate_tensors)


def tiny_recipe(
    out_dir: str | Path,
    *,
    steps: int,
    world_size: int = 1,
    replicate: int = 1,
    shard: int = 1,
    sequence_parallel: int = 1,
    accumulation: int = 1,
    activation_checkpointing: str = "none",
    compile: str = "none",
    ema_decay: float | None = 0.9,
) -> Recipe:
    dp = replicate * shard
    return Recipe(
        model=ModelConfig(teacher="tiny", dtype="fp32", teacher_dtype="fp32"),
        train=TrainConfig(
            method="dmd",
            max_steps=steps,
            global_batch_size=accumulation * dp,
            micro_batch_size=1,
            gradient_accumulation_steps=accumulation,
            mixed_precision="fp32",
            seed=7,
            log_interval=1,
            checkpoint_interval=0,
            ema_decay=ema_decay,
            output_dir=str(out_dir),
            report_to=[],
        ),
        parallel=ParallelConfig(
            world_size=world_size,
            replicate=replicate,
            shard=shard,
            sequence_parallel=sequence_parallel,
            activation_checkpointing=activation_checkpointing,
            compile=compile,
        ),
        optim=OptimConfigs(
            generator=OptimConfig(
                lr=1e-3, eps=1e-6, schedule="cosine", warmup_steps=1, grad_clip=1.0
            ),
            critic=OptimConfig(lr=2e-3, eps=1e-6, betas=(0.0, 0.99), grad_clip=0.5),
        ),
        dmd=DMDConfig(generator_update_interval=2, flow_shift=3.0, guidance_scale=3.0),
        vsa=VSAConfig(sparsity=0.5, tile_size=(1, 2, 2), backend="torch"),
    )


def negative_embedding() -> torch.Tensor:
    return torch.randn(MAX_TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(11))


def dmd_method(wan_path: str | Path, recipe: Recipe):
    from fastwan.methods.dmd import DMDMethod
    from fastwan.models import load_transformer

    return DMDMethod(load_transformer(wan_path), recipe.dmd, recipe.vsa, negative_embedding())


def full_params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full tensor (collective for FSDP-sharded ones)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in net.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
    return out


def adam_v_total(opt: torch.optim.Optimizer) -> float:
    """Sum of AdamW's second moments over all parameters (collective for sharded ones)."""
    from torch.distributed.tensor import DTensor

    total = 0.0
    for st in opt.state.values():
        v = st["exp_avg_sq"]
        total += float((v.full_tensor() if isinstance(v, DTensor) else v).sum())
    return total


def losses(history: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The history without its timings (equal between equal runs)."""
    return [{k: v for k, v in r.items() if k != "step_time"} for r in history]


# ----------------------------------------------------------------- the worker process


class ForwardValidator:
    """The contract of fastwan.train.validation.Validator, tiny: ``generate`` runs the
    generator (no grad, eval) on a fixed input, ``run`` also writes the output's mean."""

    @torch.no_grad()
    def generate(self, net: torch.nn.Module) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, *LATENT, generator=g)  # [1, C, T, H, W]
        cond = torch.randn(1, MAX_TEXT_LEN, TEXT_DIM, generator=g)  # [1, L, dim]
        net.eval()
        try:
            out = net(
                hidden_states=x,
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=cond,
                return_dict=False,
            )[0]
        finally:
            net.train()
        return out

    def run(self, net: torch.nn.Module, step: int, output_dir: str | Path) -> dict:
        mean = float(self.generate(net).mean())
        path = Path(output_dir) / f"validation-{step}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{mean}\n")
        return {"images": {}}


def train_worker(cfgs: list[dict]) -> None:
    """One rank of multi-process runs, one per config (same processes, one process group):
    build the tiny DMD setup on the config's mesh, optionally resume, train to
    ``cfg["steps"]`` (saving a checkpoint after ``cfg["save_at"]`` steps), and let rank 0
    write ``{"history", "params"}`` to ``cfg["result"]``."""
    from fastwan.distributed.mesh import destroy_parallel, init_parallel
    from fastwan.distributed.parallelize import (
        DistributedValidator,
        all_finite,
        parallelize_method,
    )
    from fastwan.train.trainer import Trainer

    try:
        for cfg in cfgs:
            recipe = tiny_recipe(
                cfg["out"],
                steps=cfg["steps"],
                world_size=cfg["world"],
                replicate=cfg.get("replicate", 1),
                shard=cfg.get("shard", cfg["world"]),
                sequence_parallel=cfg.get("sp", 1),
                accumulation=cfg.get("accum", 1),
                activation_checkpointing=cfg.get("ac", "none"),
                compile=cfg.get("compile", "none"),
            )
            state = init_parallel(recipe.parallel, "cpu")
            method = dmd_method(cfg["wan"], recipe)
            parallelize_method(method, state, recipe)
            loader = rank_loader(state.dp_rank, state.dp_size)
            validator = None
            if cfg.get("validate"):  # validation (EMA swapped in) after every step
                recipe.train.validation_interval = 1
                validator = DistributedValidator(ForwardValidator(), state)
            trainer = Trainer(
                method, recipe, loader, log_fn=lambda _l: None, parallel=state, validator=validator
            )
            resumed = None
            if cfg.get("resume"):
                trainer.resume(cfg["resume"])
                resumed = {
                    "params": {r: full_params(n) for r, n in trainer.networks.items()},
                    "position": (loader.sampler.epoch, loader.sampler.position),
                    "adam_v": {r: adam_v_total(o) for r, o in trainer.optimizers.items()},
                }
            save_at = cfg.get("save_at")
            if save_at is not None:
                trainer.train(save_at - trainer.step)
                trainer.save_checkpoint()
            trainer.train(cfg["steps"] - trainer.step)
            params = {role: full_params(net) for role, net in trainer.networks.items()}
            # a NaN on rank 1 only must be seen by every rank (they raise together)
            nan_on_1 = torch.tensor(float("nan") if state.rank == 1 else 1.0)
            finite = [all_finite(torch.tensor(1.0)), all_finite(nan_on_1)]
            if state.is_main:
                result = {
                    "history": trainer.history,
                    "params": params,
                    "finite": finite,
                    "resumed": resumed,
                    # blocks torch.compile'd in place (parallel.compile), per network
                    "compiled": {
                        role: [
                            getattr(b, "_compiled_call_impl", None) is not None for b in net.blocks
                        ]
                        for role, net in trainer.networks.items()
                    },
                }
                torch.save(result, cfg["result"])
    finally:
        destroy_parallel()


# --------------------------------------------------------- one-process emulation of D ranks


class EmulatedRanks:
    """A DMD method whose micro-batch ``i`` (tagged ``"_rank"`` by
    :func:`interleaved_loader`) is computed with data-parallel rank ``i``'s generator.

    Like the ranks of a process group, every rank draws its own rollout length but runs
    rank 0's (``fastwan.methods.dmd`` broadcasts it): rank ``i``'s micro-batch takes the
    values rank 0's micro-batch before it drew, in order."""

    name = "dmd"
    roles = ("generator", "critic")
    compute_device = None

    def __init__(self, method, seed: int, world: int):
        self.method = method
        self.generators = [
            torch.Generator().manual_seed(data_parallel_seed(seed, r)) for r in range(world)
        ]
        self._rank0_draws: list[int] = []

    def _as_rank(self, fn, batch):
        import fastwan.methods.dmd as dmd

        rank, real, used = batch["_rank"], dmd._same_on_all_ranks, iter(list(self._rank0_draws))
        if rank == 0:
            self._rank0_draws = []

        def same_on_all_ranks(value: int, device: torch.device) -> int:
            if rank == 0:
                self._rank0_draws.append(value)
                return value
            return next(used)

        dmd._same_on_all_ranks = same_on_all_ranks
        try:
            return fn(batch, self.generators[rank])
        finally:
            dmd._same_on_all_ranks = real

    @property
    def device(self) -> torch.device:
        return self.method.device

    def networks(self):
        return self.method.networks()

    def frozen_networks(self):
        return self.method.frozen_networks()

    @property
    def sparsity(self):
        return self.method.sparsity

    def set_step(self, step: int) -> None:
        self.method.set_step(step)

    def updates(self, step: int) -> tuple[str, ...]:
        return self.method.updates(step)

    def loss(self, role, batch, rng):
        del rng  # each emulated rank draws from its own
        return self._as_rank(lambda b, r: self.method.loss(role, b, r), batch)

    def load_rank_generators(self, checkpoint: str | Path) -> None:
        """The saved per-rank generator states of a multi-process checkpoint."""
        from fastwan.train.checkpoint import read_rank_rng

        for r, gen in enumerate(self.generators):
            gen.set_state(read_rank_rng(checkpoint, r)["generators"]["train"])


class interleaved_loader:  # noqa: N801 - used like a function returning an iterable
    """Rank 0's batch, rank 1's batch, ... then the next step's; resumable."""

    def __init__(self, world: int):
        self.loaders = [rank_loader(r, world) for r in range(world)]

    def __iter__(self) -> Iterator[dict]:
        iters = [iter(ld) for ld in self.loaders]
        while True:
            for r, it in enumerate(iters):
                yield {**next(it), "_rank": r}

    def state_dict(self) -> dict:
        return self.loaders[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for ld in self.loaders:
            ld.load_state_dict(state)


def reference_run(wan_path, out, *, steps: int, world: int = 2, accumulation: int = 1):
    """One process computing what ``world`` FSDP ranks, each accumulating ``accumulation``
    micro-batches, compute together: (Trainer, method)."""
    from fastwan.train.trainer import Trainer

    recipe = tiny_recipe(out, steps=steps, accumulation=world * accumulation)
    method = EmulatedRanks(dmd_method(wan_path, recipe), recipe.train.seed, world)
    trainer = Trainer(method, recipe, interleaved_loader(world), log_fn=lambda _l: None)
    return trainer, method


def assert_same_losses(got, want, rtol=1e-5):
    assert len(got) == len(want)
    for a, b in zip(losses(got), losses(want)):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for key in a:
            if isinstance(a[key], float):
                assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=1e-9), (key, a, b)
            else:  # the step, generator_updated: ints and bools, exact
                assert a[key] == b[key], (key, a, b)


def assert_same_params(got, want, atol=5e-6):
    """Max abs difference <= atol: float32 gradients summed in another order, through 3
    AdamW steps (see tests/test_distributed_fsdp.py: seen up to 2.1e-6, depending on the
    reference's thread count; the parameters move by ~2e-3 to 6e-3)."""
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name].detach()).abs().max().item()
        assert err <= atol, (name, err)
