"""FSDP2 on 2 gloo processes equals one process; invalid layouts fail before any model.

Two processes (shard 2: plain FSDP; and replicate 2: the 2-D HSDP mesh with a shard size
of 1) train the tiny DMD setup of ``tests/_dist.py`` for 3 steps (the generator updates
at steps 1 and 3, the critic every step) with the real :class:`Trainer`. The reference
is one process running the same Trainer over both ranks' micro-batches, each drawn with
its rank's generator (:class:`_dist.EmulatedRanks`), which is what the two ranks compute
together: the mean of their gradients; also with 2 accumulated micro-batches per rank
(reduced once, after the second). With sequence parallel 2 (and selective activation
checkpointing) the two ranks form one data-parallel rank: the reference is one plain
process on that rank's data.

Tolerance: logged losses and grad norms rtol 1e-5 (seen: 2e-7); parameters of generator
and critic atol 5e-6 after 3 AdamW steps at lr 1e-3 / 2e-3 (Adam moves them by up to
lr x updates: 2e-3 / 6e-3; a wrong gradient by as much). The only difference is float32
summation order (FSDP reduce-scatter: (g0 + g1) / 2; reference: g0 / 2 + g1 / 2; SP: two
halves of the tokens; the workers run 1 thread, the reference the parent's thread count),
~1e-7 relative on most gradients, but Adam divides by |g| + eps, so an element whose
gradient is a cancelled sum (patch_embedding's: over every token) turns it into update
differences up to ~2e-6 (seen: 1.5e-6 with a 2-thread reference, 2.1e-6 with 1 thread).
AdamW's eps is 1e-6 in this recipe: with 1e-8, elements whose gradient is ~1e-8 turn
those rounding differences into update differences of ~1e-5.
"""

from __future__ import annotations

import pytest
import torch
from _dist import (
    assert_same_losses,
    assert_same_params,
    dmd_method,
    rank_loader,
    reference_run,
    spawn,
    tiny_recipe,
    train_worker,
)
from _tiny_wan import build_tiny_wan

from fastwan.config import ParallelConfig
from fastwan.distributed.mesh import data_parallel_seed, validate_layout
from fastwan.train.trainer import Trainer

STEPS = 3


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), num_layers=2)


def test_fsdp_training_equals_one_process(wan_path, tmp_path):
    layouts = {
        # with validation of the EMA weights after every step (must not change training)
        "fsdp": {"shard": 2, "validate": True},
        "replicate": {"replicate": 2, "shard": 1},
        # 2 micro-batches per rank and step: gradients reduced after the second only
        "accum": {"shard": 2, "accum": 2},
        # Ulysses SP 2 (one data-parallel rank) with selective activation checkpointing
        "sp": {"shard": 1, "sp": 2, "ac": "selective"},
        # torch.compile'd blocks (Dynamo + AOTAutograd) under full checkpointing and FSDP2
        "compiled": {"shard": 2, "ac": "full", "compile": "aot_eager"},
    }
    base = {"wan": str(wan_path), "world": 2, "steps": STEPS}
    cfgs = [
        {**base, "out": str(tmp_path / name), "result": str(tmp_path / f"{name}.pt"), **layout}
        for name, layout in layouts.items()
    ]
    spawn(train_worker, 2, cfgs)  # all layouts in the same two processes

    trainer, _ = reference_run(wan_path, tmp_path / "ref", steps=STEPS)
    trainer.train(STEPS)
    assert [r["generator_updated"] for r in trainer.history] == [True, False, True]
    written = sorted(p.name for p in (tmp_path / "fsdp").glob("validation-*.txt"))
    assert written == [f"validation-{i}.txt" for i in range(1, STEPS + 1)]  # rank 0 wrote
    for name in ("fsdp", "replicate", "compiled"):
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        compiled = [all(flags) for flags in got["compiled"].values()]
        assert compiled == [name == "compiled"] * len(compiled)
        assert got["finite"] == [True, False]  # rank 0 saw rank 1's NaN
        assert_same_losses(got["history"], trainer.history)
        for role, net in trainer.networks.items():
            assert_same_params(got["params"][role], dict(net.named_parameters()))

    # gradient accumulation: what 2 ranks x 2 micro-batches compute = 4 micro-batches
    trainer4, _ = reference_run(wan_path, tmp_path / "ref4", steps=STEPS, accumulation=2)
    trainer4.train(STEPS)
    got = torch.load(tmp_path / "accum.pt", weights_only=True)
    assert_same_losses(got["history"], trainer4.history)
    for role, net in trainer4.networks.items():
        assert_same_params(got["params"][role], dict(net.named_parameters()))

    # SP ranks share data, timesteps and noise: the run equals one process on rank 0's data
    recipe = tiny_recipe(tmp_path / "ref_sp", steps=STEPS)
    single = Trainer(dmd_method(wan_path, recipe), recipe, rank_loader(0, 1), log_fn=print)
    single.train(STEPS)
    got = torch.load(tmp_path / "sp.pt", weights_only=True)
    assert_same_losses(got["history"], single.history)
    for role, net in single.networks.items():
        assert_same_params(got["params"][role], dict(net.named_parameters()))

    # training did move the student
    start = dict(dmd_method(wan_path, trainer.recipe).student.named_parameters())
    generator = trainer.networks["generator"].named_parameters()
    assert max((p.detach() - start[n]).abs().max() for n, p in generator) > 1e-4


def test_seeds_differ_per_data_parallel_rank():
    assert data_parallel_seed(7, 0) == 7  # one process = data-parallel rank 0
    seeds = {data_parallel_seed(s, r) for s in range(4) for r in range(4)}
    assert len(seeds) == 16
    with pytest.raises(ValueError, match="dp_rank"):
        data_parallel_seed(7, -1)


def _layout(**kw) -> ParallelConfig:
    return ParallelConfig(**kw)


def test_invalid_layouts_are_refused():
    bad = _layout(world_size=4, replicate=2, shard=2)
    bad.shard = 3  # mutated after its own validation
    with pytest.raises(ValueError, match=r"2 x 3 x 1 = 6 must equal parallel.world_size \(4\)"):
        validate_layout(bad, world_size=4)
    with pytest.raises(ValueError, match="replicate x shard x sequence_parallel"):
        ParallelConfig(world_size=8, replicate=2, shard=2, sequence_parallel=1)
    with pytest.raises(ValueError, match=r"world_size is 4 but 2 process\(es\)"):
        validate_layout(_layout(world_size=4, shard=4), world_size=2)
    with pytest.raises(ValueError, match=r"sequence_parallel \(4\) must divide the model's 2"):
        validate_layout(_layout(world_size=4, sequence_parallel=4), world_size=4, num_heads=2)
    validate_layout(_layout(world_size=4, shard=2, sequence_parallel=2), world_size=4, num_heads=2)


def test_build_refuses_bad_layouts_before_loading_models(wan_path, tmp_path, monkeypatch):
    import fastwan.train.build as build

    def no_models(*_a, **_k):
        raise AssertionError("a model was loaded before the layout was checked")

    monkeypatch.setattr(build, "_load", no_models)
    monkeypatch.setattr(build, "_encode_prompts", no_models)
    recipe = tiny_recipe(tmp_path, steps=1, world_size=2, shard=2)
    recipe.model.teacher = str(wan_path)
    recipe.data.path = str(tmp_path)
    with pytest.raises(ValueError, match=r"torchrun --nproc_per_node=2"):
        build.build_trainer(recipe, device="cpu")  # one process running, two asked for
    # four processes "running" with sequence parallel 4 but the tiny Wan has 2 heads
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    recipe.parallel = ParallelConfig(world_size=4, sequence_parallel=4)
    recipe.train.global_batch_size = 1
    with pytest.raises(ValueError, match="must divide the model's 2 attention heads"):
        build.build_trainer(recipe, device="cpu")
