"""``fastwan plan``: per-GPU memory estimates of the seed recipes, from configs only.

Structural facts an estimate must satisfy (more sharding -> less memory per GPU,
checkpointing -> less activation memory, SP splits tokens), the parameter counts (of
diffusers' model built on the meta device) against real tiny models materialised on the
CPU and their saved safetensors, and against the published sizes, the activation count
against what autograd really saves in a Wan block (text- and image-to-video), and the
command's exit status.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _tiny_wan import (
    add_fastvideo_gates,
    build_tiny_wan,
    build_tiny_wan_i2v,
    tiny_transformer_config,
)

from fastwan.cli import main
from fastwan.config import load_recipe
from fastwan.models.presets import get_preset, transformer_config
from fastwan.plan import (
    GIB,
    Layout,
    NetworkSpec,
    WanArch,
    block_activation_bytes,
    estimate_memory,
    plan_recipe,
    resolve_model,
    rope_bytes_per_token,
    smallest_fitting_shard,
)
from fastwan.shapes import latent_grid

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


def _stored_sizes(transformer_dir: Path) -> tuple[int, int]:
    """``(all, gate)`` parameter numbers of a saved transformer, summed from the shapes in
    its safetensors headers (no model code involved)."""
    from safetensors import safe_open

    total = gates = 0
    for file in sorted(transformer_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = math.prod(f.get_slice(key).get_shape())
                total += n
                gates += n if ".to_gate_compress." in key else 0
    return total, gates


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_parameter_count_equals_a_real_tiny_model_and_its_saved_tensors(tmp_path, task):
    """The plan's count (meta build of the folder's config) against the tensors of the
    checkpoint on disk and the model fastwan's loader materialises from it on the CPU."""
    from fastwan.models.loading import load_transformer

    if task == "t2v":
        folder = build_tiny_wan(tmp_path / "wan", num_layers=3, gates="fastvideo")
    else:  # image cross-attention, CLIP image embedder, 36 input channels
        folder = build_tiny_wan_i2v(tmp_path / "wan", num_layers=3)
        add_fastvideo_gates(folder / "transformer")
    arch, stride, _ = resolve_model(str(folder))
    assert arch.image_attention == (task == "i2v") and stride == (4, 8, 8)
    stored, stored_gates = _stored_sizes(folder / "transformer")
    assert stored_gates > 0
    assert (arch.params, arch.gate_params) == (stored, stored_gates)
    model = load_transformer(folder)  # real CPU tensors, the gates as the loader adds them
    assert arch.params == sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    assert arch.block_params == max(blocks)
    assert arch.root_params == arch.params - sum(blocks) > 0


def test_a_folder_without_gates_is_counted_with_the_gates_the_loader_adds(tmp_path):
    from fastwan.models.loading import load_transformer

    folder = build_tiny_wan_i2v(tmp_path / "wan", num_layers=2)
    stored, stored_gates = _stored_sizes(folder / "transformer")
    arch = resolve_model(str(folder))[0]
    assert stored_gates == 0 and arch.params - arch.gate_params == stored
    assert arch.params == sum(p.numel() for p in load_transformer(folder).parameters())


@pytest.mark.parametrize(
    "preset, published",
    [
        ("wan2.1-t2v-1.3b", 1.42e9),
        ("wan2.1-t2v-14b", 14.29e9),
        ("wan2.2-ti2v-5b", 5.0e9),
        ("wan2.1-i2v-14b-480p", 16.4e9),
        ("wan2.1-i2v-14b-720p", 16.4e9),
    ],
)
def test_preset_parameter_counts_match_the_published_sizes(preset, published):
    """Wan2.1 "1.3B" has 1.42e9 parameters, "14B" T2V 14.29e9, I2V 16.4e9 (its image
    cross-attention), Wan2.2 "5B" 5.00e9; fastwan's gates come on top."""
    p = get_preset(preset)
    arch, _, text_length = resolve_model(p.hub_id)
    assert arch == WanArch.from_config(transformer_config(p)) and text_length == 512
    assert abs(arch.params - arch.gate_params - published) / published < 0.02
    assert arch.image_attention == (p.task == "i2v")
    assert (arch.dim, arch.num_layers, arch.num_heads) == (p.dim, p.num_layers, p.num_heads)


def test_an_i2v_teacher_needs_more_memory_than_the_t2v_one():
    t2v = _plan(R14)
    i2v = _plan(R14, ["--model.teacher=Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"])
    for a, b in zip(t2v.networks, i2v.networks):
        assert b.params > 1.1 * a.params and b.state_bytes > a.state_bytes
        assert b.activation_bytes["none"] >= a.activation_bytes["none"]
    assert i2v.activation_bytes("none") > t2v.activation_bytes("none")
    assert i2v.total_bytes() > t2v.total_bytes()


def test_bad_configs_are_value_errors():
    with pytest.raises(ValueError, match="not a Wan transformer config"):
        WanArch.from_config({"num_attention_heads": "many"})


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_activation_count_equals_what_autograd_saves_in_a_wan_block(task):
    """Measure the tensors autograd saves in one diffusers Wan block (bf16 autocast and
    fp32) and compare with the per-token count the estimate uses."""
    from diffusers import WanTransformer3DModel

    from fastwan.models.vsa import set_attention

    config = tiny_transformer_config("wan2.1", num_layers=1)
    config.update(num_attention_heads=4, attention_head_dim=16, ffn_dim=160)
    context = 16  # text tokens
    if task == "i2v":  # diffusers' processor takes all but the last 512 tokens as image
        config.update(in_channels=36, image_dim=24, added_kv_proj_dim=64)
        context = 7 + 512
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(**config)
    set_attention(model, "dense")
    arch = WanArch.from_config(config)
    assert arch.image_attention == (task == "i2v")
    grid, S = (3, 6, 20), 360  # a token count no other dimension equals
    g = torch.Generator().manual_seed(0)
    rope = model.rope(torch.zeros(1, 16, grid[0], 2 * grid[1], 2 * grid[2]))
    x = torch.randn(1, S, arch.dim, generator=g).requires_grad_(True)  # [B, S, dim]
    text = torch.randn(1, context, arch.dim, generator=g)  # [B, L (+ image), dim]
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
    with pytest.raises(ValueError, match=r"data\.num_frames=60 .*nearest valid data\.num_frames"):
        _plan(R14, ["--data.num_frames=60"])
    with pytest.raises(ValueError, match="neither a local folder nor a known preset"):
        resolve_model("nobody/no-such-model")
