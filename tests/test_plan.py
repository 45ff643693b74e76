"""``fastwan plan``: per-GPU memory estimates of the seed recipes, from configs only.

Structural facts an estimate must satisfy (more sharding -> less memory per GPU,
checkpointing -> less activation memory, SP splits tokens), the parameter counts against
diffusers' own model (built on the meta device) and the published sizes, the activation
count against what autograd really saves in a Wan block, and the command's exit status.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_wan import tiny_transformer_config

from fastwan.cli import main
from fastwan.config import load_recipe
from fastwan.distributed.memory_plan import (
    GIB,
    Layout,
    NetworkSpec,
    WanArch,
    block_activation_bytes,
    estimate_memory,
    latent_grid,
    plan_recipe,
    resolve_model,
    rope_bytes_per_token,
    smallest_fitting_shard,
)
from fastwan.models.presets import get_preset, transformer_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
R13 = RECIPES / "wan2.1_t2v_1.3b_sparse_distill.yaml"
R14 = RECIPES / "wan2.1_t2v_14b_sparse_distill.yaml"
R5 = RECIPES / "wan2.2_ti2v_5b_datafree_distill.yaml"
H100, H200 = 80.0, 141.0


def _plan(recipe_path, overrides=(), nodes=8, gpus=8, memory=H200, **kw):
    recipe = load_recipe(recipe_path, list(overrides))
    return plan_recipe(recipe, nodes=nodes, gpus_per_node=gpus, gpu_memory_gb=memory, **kw)


def _single_gpu(batch: int) -> list[str]:
    return [
        "--parallel.world_size=1",
        "--parallel.replicate=1",
        "--parallel.shard=1",
        "--parallel.sequence_parallel=1",
        f"--train.global_batch_size={batch}",
    ]


@pytest.mark.parametrize(
    "preset, published",
    [("wan2.1-t2v-1.3b", 1.42e9), ("wan2.1-t2v-14b", 14.29e9), ("wan2.2-ti2v-5b", 5.0e9)],
)
def test_parameter_count_matches_diffusers_and_the_published_size(preset, published):
    from diffusers import WanTransformer3DModel

    from fastwan.models.vsa import add_vsa_gates

    config = transformer_config(get_preset(preset))
    arch = WanArch.from_config(config)
    with torch.device("meta"):  # no memory, exact shapes
        model = WanTransformer3DModel(**config)
        base = sum(p.numel() for p in model.parameters())
        add_vsa_gates(model)
        gated = sum(p.numel() for p in model.parameters())
    assert arch.param_count(gates=False) == base
    assert arch.param_count(gates=True) == gated
    # Wan2.1 "1.3B" has 1.42e9 parameters, "14B" 14.29e9, Wan2.2 "5B" 5.00e9.
    assert abs(base - published) / published < 0.02


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_activation_count_equals_what_autograd_saves_in_a_wan_block():
    """Measure the tensors autograd saves in one diffusers Wan block (bf16 autocast and
    fp32) and compare with the per-token count the estimate uses."""
    from diffusers import WanTransformer3DModel

    from fastwan.models.vsa import set_attention

    config = tiny_transformer_config("wan2.1", num_layers=1)
    config.update(num_attention_heads=4, attention_head_dim=16, ffn_dim=160)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(**config)
    set_attention(model, "dense")
    arch = WanArch.from_config(config)
    grid, S = (3, 6, 20), 360  # a token count no other dimension equals
    g = torch.Generator().manual_seed(0)
    rope = model.rope(torch.zeros(1, 16, grid[0], 2 * grid[1], 2 * grid[2]))
    x = torch.randn(1, S, arch.dim, generator=g).requires_grad_(True)  # [B, S, dim]
    text = torch.randn(1, 16, arch.dim, generator=g)  # [B, L, dim]
    temb = torch.randn(1, 6, arch.dim, generator=g)  # [B, 6, dim]
    for autocast, cbytes in ((True, 2), (False, 4)):
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            if S in t.shape:  # per-token tensors (weights and text are counted elsewhere)
                storage = t.untyped_storage()
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model.blocks[0](x.to(torch.bfloat16) if autocast else x, text, temb, rope)
        per_token, _ = block_activation_bytes(arch, cbytes, text_length=16)
        expected = S * (per_token + rope_bytes_per_token(arch))
        assert abs(sum(saved.values()) - expected) / expected < 0.05, (autocast, saved)


@pytest.mark.parametrize("recipe", [R13, R14, R5])
@pytest.mark.parametrize("memory", [H100, H200])
def test_checkpointing_reduces_activations_and_never_changes_states(recipe, memory):
    plan = _plan(recipe, memory=memory)
    acts = {m: plan.activation_bytes(m) for m in ("none", "selective", "full")}
    assert acts["none"] > acts["selective"] > acts["full"] > 0
    assert acts["none"] > 5 * acts["full"]  # a 30-40 block model: big savings
    for n in plan.networks:
        assert n.spec.trainable or all(a == 0 for a in n.activation_bytes.values())
    totals = [plan.total_bytes(m) for m in ("none", "selective", "full")]
    assert totals == sorted(totals, reverse=True)
    assert plan.fits == plan.fits_with(plan.checkpointing)
    assert [n.spec.role for n in plan.networks] == ["student", "critic", "teacher"]


def test_more_shard_means_less_state_memory_per_gpu():
    previous = None
    for shard in (1, 2, 4, 8, 16):
        over = [f"--parallel.shard={shard}", f"--parallel.replicate={16 // shard}"]
        plan = _plan(R14, over, nodes=8, gpus=8)  # 64 GPUs: replicate follows
        student = plan.networks[0]
        assert plan.layout.fsdp_size == shard * 4
        if previous is not None:
            assert student.param_bytes == pytest.approx(previous.param_bytes / 2)
            assert student.optim_bytes == pytest.approx(previous.optim_bytes / 2)
            assert student.grad_bytes < previous.grad_bytes
        previous = student


def test_sequence_parallel_splits_tokens_and_activations():
    base = ["--parallel.shard=8", "--train.global_batch_size=64"]
    sp1 = _plan(
        R14,
        [
            *base,
            "--parallel.sequence_parallel=1",
            "--parallel.replicate=8",
            "--train.gradient_accumulation_steps=1",
        ],
    )
    sp4 = _plan(R14, [*base, "--parallel.sequence_parallel=4", "--parallel.replicate=2"])
    assert sp1.tokens == sp4.tokens == 16 * 28 * 52  # 61x448x832 -> 16x56x104 latents
    assert sp4.tokens_per_gpu == sp1.tokens_per_gpu // 4
    for mode in ("none", "full"):
        ratio = sp1.activation_bytes(mode) / sp4.activation_bytes(mode)
        assert 3.0 < ratio <= 4.0  # the per-sample text part is not split
    over = ["--parallel.sequence_parallel=8", "--parallel.replicate=4"]
    bad = load_recipe(R13, [*over, "--train.gradient_accumulation_steps=16"])
    with pytest.raises(ValueError, match=r"num_attention_heads \(12\).*sequence_parallel \(8\)"):
        plan_recipe(bad, nodes=4, gpus_per_node=8, gpu_memory_gb=H200)


def test_micro_batch_scales_activations_not_states():
    one = _plan(R13, nodes=4)
    two = _plan(R13, ["--train.micro_batch_size=2", "--train.global_batch_size=128"], nodes=4)
    assert two.activation_bytes("full") == pytest.approx(2 * one.activation_bytes("full"))
    assert two.state_bytes == one.state_bytes  # exact: the same Python arithmetic, no batch term


def test_the_14b_recipe_fits_its_64_gpu_layout_with_checkpointing():
    for memory in (H200, H100):
        plan = _plan(R14, memory=memory)
        assert (plan.layout.replicate, plan.layout.shard, plan.layout.sequence_parallel) == (
            2,
            8,
            4,
        )
        assert plan.checkpointing == "full" and plan.fits
    # without checkpointing, 40 blocks of 5,824 tokens x 5,120 dims do not fit an H100
    assert not _plan(R14, memory=H100).fits_with("none")


def test_14b_unsharded_on_one_gpu_does_not_fit():
    plan = _plan(R14, _single_gpu(4), nodes=1, gpus=1, memory=H100)
    assert plan.layout.fsdp_size == 1
    # 15.3e9 parameters x (4 fp32 + 4 grad + 8 AdamW) bytes for the student alone
    assert plan.networks[0].state_bytes > 200 * GIB
    assert not plan.fits and not plan.fits_with("full")
    assert not _plan(R14, _single_gpu(4), nodes=1, gpus=1, memory=H200).fits


def test_13b_recipe_fits_on_h100_and_suggestion_for_5b():
    assert _plan(R13, nodes=4, memory=H100).fits
    # the 5B recipe's fp32 master weights of two 5.3e9-parameter networks need sharding
    recipe = load_recipe(R5)
    shard = smallest_fitting_shard(recipe, nodes=8, gpus_per_node=8, gpu_memory_gb=H200)
    assert shard is not None and shard > 1
    assert _plan(R5, [f"--parallel.shard={shard}", f"--parallel.replicate={64 // shard}"]).fits


def test_local_folder_config_is_read(tmp_path):
    from diffusers import WanTransformer3DModel

    from fastwan.models.vsa import add_vsa_gates

    config = tiny_transformer_config("wan2.1", num_layers=3)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    (tmp_path / "vae").mkdir()
    vae = {"scale_factor_temporal": 4, "scale_factor_spatial": 8}
    (tmp_path / "vae" / "config.json").write_text(json.dumps(vae))
    over = [
        f"--model.teacher={tmp_path}",
        "--data.num_frames=9",
        "--data.height=64",
        "--data.width=96",
    ]
    plan = _plan(R13, over, nodes=4)
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
        add_vsa_gates(model)
    assert plan.networks[2].params == sum(p.numel() for p in model.parameters())
    assert plan.latent_grid == (3, 8, 12) and plan.tokens == 3 * 4 * 6


def test_cli_prints_the_table_and_exits_by_fit(capsys):
    rc = main(["plan", str(R14), "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gb", "141"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("student", "critic", "teacher", "replicate 2 x shard 8 x sequence_parallel 4"):
        assert word in out
    assert "verdict: fits" in out
    args = ["plan", str(R14), "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gb", "80"]
    assert main([*args, *_single_gpu(4)]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main([*args, *_single_gpu(4), "--no-fail"]) == 0
    # bad input: a clear error and exit status 2
    assert main(["plan", str(R14), "--nodes", "8", "--gpus-per-node", "8"]) == 2
    assert "--gpu-memory-gb" in capsys.readouterr().err
    assert (
        main(["plan", str(R14), "--nodes", "3", "--gpus-per-node", "1", "--gpu-memory-gb", "80"])
        == 2
    )
    assert "multiple of 32" in capsys.readouterr().err


def _specs_14b():
    arch, stride, text_length = resolve_model("Wan-AI/Wan2.1-T2V-14B-Diffusers")
    specs = [
        NetworkSpec("student", "s", arch, "fp32", trainable=True, vsa=True),
        NetworkSpec("critic", "c", arch, "fp32", trainable=True, vsa=False),
        NetworkSpec("teacher", "t", arch, "bf16", trainable=False, vsa=False),
    ]
    return specs, latent_grid(61, 448, 832, stride), text_length


def test_cpu_offload_moves_states_off_the_gpu_only_when_sharded():
    specs, grid, text_length = _specs_14b()
    kw = dict(latent_grid=grid, micro_batch_size=1, gpu_memory_gb=H100, text_length=text_length)
    sharded = Layout(replicate=2, shard=8, sequence_parallel=4)
    on = estimate_memory(specs, sharded, cpu_offload=True, **kw)
    off = estimate_memory(specs, sharded, cpu_offload=False, **kw)
    assert on.state_bytes == off.state_bytes > 0  # exact: offload only moves where they live
    assert off.total_bytes() - on.total_bytes() == pytest.approx(off.state_bytes)
    single = Layout(replicate=1, shard=1, sequence_parallel=1)  # no FSDP: nothing offloads
    assert estimate_memory(specs, single, cpu_offload=True, **kw).gpu_state_bytes > 0


def test_bad_estimate_inputs_are_value_errors():
    specs, grid, _ = _specs_14b()
    layout = Layout(replicate=1, shard=8, sequence_parallel=1)
    kw = dict(latent_grid=grid, micro_batch_size=1, gpu_memory_gb=H100)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        estimate_memory(specs, layout, checkpointing="some", **kw)
    with pytest.raises(ValueError, match="parallel.shard"):
        Layout(replicate=1, shard=0, sequence_parallel=1)
    with pytest.raises(ValueError, match="data.num_frames"):
        latent_grid(60, 448, 832, (4, 8, 8))
    with pytest.raises(ValueError, match="neither a local folder nor a known preset"):
        resolve_model("nobody/no-such-model")
