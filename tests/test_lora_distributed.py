"""LoRA sparse distillation (one shared base) on 2 gloo processes equals one process.

The tiny DMD setup of ``tests/_dist.py`` with ``lora.rank: 4``: the teacher is built on
the meta device (each rank reads its shards of the one base), the adapters are initialised
from the seed after sharding, then trained with the real :class:`Trainer` for 3 steps:

* ``fsdp``: shard 2, validation of the adapter's EMA after every step;
* ``accum``: shard 2 with 2 micro-batches per rank, ``lora.gates: full`` (the gate weights
  train beside the frozen base in the same FSDP units);
* ``sp``: Ulysses sequence parallel 2 with selective activation checkpointing (one
  data-parallel rank: the reference is a plain process on its data);
* ``bf16``: the base in bf16, the adapters in fp32 (mixed dtypes in one FSDP unit);
* resume: a 2-process checkpoint continues in one process, and a one-process checkpoint
  on 2 processes, as the uninterrupted reference run did.

The reference computes what the ranks compute together (``_dist.EmulatedRanks``).
Tolerances as in ``tests/test_distributed_fsdp.py`` (float32 summation order only); the
bf16 base: rtol 1e-3 (bf16 rounding of the same operations).
"""

from __future__ import annotations

import pytest
import torch
from _dist import (
    EmulatedRanks,
    ForwardValidator,
    assert_same_losses,
    assert_same_params,
    interleaved_loader,
    negative_embedding,
    rank_loader,
    spawn,
    tiny_recipe,
)
from _tiny_wan import build_tiny_wan

from fastwan.config import LoRAConfig
from fastwan.train.checkpoint import read_marker
from fastwan.train.trainer import Trainer

STEPS, SAVE_AT = 3, 2


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), num_layers=2)


def lora_recipe(out, *, gates: str = "lora", base_dtype: str = "fp32", **kw):
    recipe = tiny_recipe(out, **kw)
    recipe.lora = LoRAConfig(rank=4, gates=gates)
    recipe.model.teacher_dtype = base_dtype
    return recipe


def lora_method(wan_path, recipe, device: str | None = None):
    from fastwan.config import torch_dtype
    from fastwan.methods.dmd import DMDMethod
    from fastwan.models import load_transformer

    teacher = load_transformer(
        wan_path, dtype=torch_dtype(recipe.model.teacher_dtype), device=device or "cpu"
    )
    return DMDMethod(
        teacher,
        recipe.dmd,
        recipe.vsa,
        negative_embedding(),
        lora=recipe.lora,
        lora_dtype=torch_dtype(recipe.model.dtype),
        seed=recipe.train.seed,
    )


def trained(method) -> dict[str, dict[str, torch.Tensor]]:
    """Each role's trained parameters as full tensors (collective for sharded ones)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for role in method.roles:
        out[role] = {
            n: (p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()).clone()
            for n, p in method.trained_parameters(role).items()
        }
    return out


def worker(cfgs: list[dict]) -> None:
    from fastwan.distributed.mesh import destroy_parallel, init_parallel
    from fastwan.distributed.parallelize import DistributedValidator, parallelize_method

    try:
        for cfg in cfgs:
            recipe = lora_recipe(
                cfg["out"],
                steps=STEPS,
                world_size=2,
                shard=cfg.get("shard", 2),
                sequence_parallel=cfg.get("sp", 1),
                accumulation=cfg.get("accum", 1),
                activation_checkpointing=cfg.get("ac", "none"),
                gates=cfg.get("gates", "lora"),
                base_dtype=cfg.get("base_dtype", "fp32"),
            )
            state = init_parallel(recipe.parallel, "cpu")
            method = lora_method(cfg["wan"], recipe, device="meta")  # each rank: its shards
            parallelize_method(method, state, recipe)
            method.init_adapters()
            validator = None
            if cfg.get("validate"):
                recipe.train.validation_interval = 1
                validator = DistributedValidator(ForwardValidator(), state)
            loader = rank_loader(state.dp_rank, state.dp_size)
            trainer = Trainer(
                method, recipe, loader, log_fn=lambda _l: None, parallel=state, validator=validator
            )
            resumed = None
            if cfg.get("resume"):
                trainer.resume(cfg["resume"])
                resumed = trained(method)
            if cfg.get("save_at"):
                trainer.train(cfg["save_at"] - trainer.step)
                trainer.save_checkpoint()
            trainer.train(STEPS - trainer.step)
            params = trained(method)
            base = {  # one rank's shards of the frozen base: they must not move
                n: p.detach().to_local().clone()
                for n, p in method.teacher.named_parameters()
                if not p.requires_grad
            }
            if state.is_main:
                torch.save(
                    {
                        "history": trainer.history,
                        "params": params,
                        "resumed": resumed,
                        "base": base,
                    },
                    cfg["result"],
                )
    finally:
        destroy_parallel()


class LoraEmulatedRanks(EmulatedRanks):
    """``_dist.EmulatedRanks`` passing on what a LoRA method says about its roles."""

    def trained_parameters(self, role):
        return self.method.trained_parameters(role)

    def prepare(self, role):
        self.method.prepare(role)


def reference(wan_path, out, *, accumulation: int = 1, **kw):
    recipe = lora_recipe(out, steps=STEPS, accumulation=2 * accumulation, **kw)
    inner = lora_method(wan_path, recipe)
    method = LoraEmulatedRanks(inner, recipe.train.seed, 2)
    trainer = Trainer(method, recipe, interleaved_loader(2), log_fn=lambda _l: None)
    return trainer, inner, method


@pytest.fixture(scope="module")
def runs(wan_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_runs")
    one, one_inner, _ = reference(wan_path, root / "one")  # the one-process checkpoint
    one.train(SAVE_AT)
    one_ckpt = one.save_checkpoint()
    base = {"wan": str(wan_path)}
    layouts = {
        "fsdp": {"validate": True, "save_at": SAVE_AT},
        "accum": {"accum": 2, "gates": "full"},
        "sp": {"shard": 1, "sp": 2, "ac": "selective"},
        "bf16": {"base_dtype": "bf16"},
        "from_one": {"resume": str(one_ckpt)},
    }
    cfgs = [
        {**base, "out": str(root / n), "result": str(root / f"{n}.pt"), **layout}
        for n, layout in layouts.items()
    ]
    spawn(worker, 2, cfgs)
    results = {n: torch.load(root / f"{n}.pt", weights_only=True) for n in layouts}
    return root, results, one, one_inner


def test_lora_fsdp_equals_one_process(wan_path, tmp_path, runs):
    root, results, _, _ = runs
    ref, inner, _ = reference(wan_path, tmp_path / "ref")
    ref.train(STEPS)
    assert [r["generator_updated"] for r in ref.history] == [True, False, True]
    got = results["fsdp"]
    assert_same_losses(got["history"], ref.history)
    want = trained(inner)
    for role in want:
        assert_same_params(got["params"][role], want[role])
    written = sorted(p.name for p in (root / "fsdp").glob("validation-*.txt"))
    assert written == [f"validation-{i}.txt" for i in range(1, STEPS + 1)]
    assert all(
        not torch.equal(p, torch.zeros_like(p))
        for n, p in want["generator"].items()
        if "lora_B" in n
    )

    # the frozen base (= the teacher) kept the values it was read with
    from fastwan.models import load_transformer

    fresh = dict(load_transformer(wan_path).named_parameters())
    for name, shard in got["base"].items():
        plain = name.replace(".base_layer", "")
        if plain in fresh:
            assert torch.equal(shard, fresh[plain][: shard.shape[0]]) or shard.numel() == 0, name


def test_lora_accumulation_with_full_gates(wan_path, tmp_path, runs):
    ref, inner, _ = reference(wan_path, tmp_path / "ref4", accumulation=2, gates="full")
    ref.train(STEPS)
    got = runs[1]["accum"]
    assert_same_losses(got["history"], ref.history)
    want = trained(inner)
    assert any("to_gate_compress.weight" in n for n in want["generator"])
    for role in want:
        assert_same_params(got["params"][role], want[role])


def test_lora_sequence_parallel_with_checkpointing(wan_path, tmp_path, runs):
    recipe = lora_recipe(tmp_path / "sp_ref", steps=STEPS)
    method = lora_method(wan_path, recipe)
    single = Trainer(method, recipe, rank_loader(0, 1), log_fn=lambda _l: None)
    single.train(STEPS)
    got = runs[1]["sp"]
    assert_same_losses(got["history"], single.history)
    want = trained(method)
    for role in want:
        assert_same_params(got["params"][role], want[role])


def test_lora_bf16_base_with_fp32_adapters(wan_path, tmp_path, runs):
    ref, inner, _ = reference(wan_path, tmp_path / "ref_bf16", base_dtype="bf16")
    ref.train(STEPS)
    assert inner.teacher.patch_embedding.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in inner.trained_parameters("generator").values())
    got = runs[1]["bf16"]
    assert_same_losses(got["history"], ref.history, rtol=1e-3)
    want = trained(inner)
    for role in want:
        assert_same_params(got["params"][role], want[role], atol=1e-4)


def test_lora_checkpoints_resume_across_process_counts(wan_path, tmp_path, runs):
    root, results, one, one_inner = runs
    # 2 processes saved at step 2: one process continues as the 2-process run did
    ckpt = root / "fsdp" / f"checkpoint-{SAVE_AT}"
    assert read_marker(ckpt)["layout"]["world_size"] == 2
    ref, inner, emulated = reference(wan_path, tmp_path / "resumed")
    assert ref.resume(ckpt) == ckpt and ref.step == SAVE_AT
    emulated.load_rank_generators(ckpt)
    ref.train(STEPS - SAVE_AT)
    assert_same_losses(ref.history, results["fsdp"]["history"])
    for role, params in trained(inner).items():
        assert_same_params(params, results["fsdp"]["params"][role])

    # one process saved at step 2: the 2 processes load its adapters (and their AdamW
    # states, the schedule, the data position) and go on; their random streams are new (the
    # emulated ranks' generators are not the trainer's), so step 3 is only checked to run
    got = results["from_one"]
    saved = trained(one_inner)
    for role, params in saved.items():
        for name, value in params.items():
            assert torch.equal(got["resumed"][role][name], value), (role, name)
    assert_same_losses(got["history"][:SAVE_AT], one.history)
    last = got["history"][-1]
    assert last["step"] == STEPS and last["generator_updated"]
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("generator_loss", "critic_loss"))
    moved = got["params"]["generator"]
    assert any(not torch.equal(moved[n], got["resumed"]["generator"][n]) for n in moved)
