"""LoRA at inference: ``VideoGenerator.load_lora`` / ``set_lora_scale`` / ``unload_lora`` /
``loras``, ``fastwan generate --lora``, and the 14B LoRA recipe's plan.

* A video with a LoRA equals diffusers' ``WanPipeline`` with ``load_lora_weights`` +
  ``set_adapters`` at that scale (dense attention, the folder's UniPC scheduler, CFG), for
  fastwan's own export and, together with it, an original-Wan-format LoRA from elsewhere.
* With VSA and a fastwan LoRA folder (its gates included) the video equals the merged
  model's; unloading gives the base video back exactly.
* ``fastwan generate --lora PATH[:SCALE]`` applies it, and a missing file is refused before
  any weight loads; ``--num-gpus`` is checked there too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_wan import build_tiny_wan
from safetensors.torch import save_file
from test_lora_files import _adapted

import fastwan.cli as cli
from fastwan.models.lora import LORA_FILE, adapter_names, lora_layers, merge_lora, save_lora
from fastwan.pipeline import VideoGenerator
from fastwan.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
# 3 UniPC steps with CFG (Wan's sampling): what diffusers' WanPipeline runs
WAN = dict(
    prompt="a red cat runs on the road",
    negative_prompt="blurry, low quality",
    height=32,
    width=48,
    num_frames=5,
    num_inference_steps=3,
    guidance_scale=5.0,
    max_sequence_length=16,
)
FAST = dict(height=32, width=48, num_frames=5, max_sequence_length=16)  # 3 DMD steps, VSA


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan21"))


@pytest.fixture(scope="module")
def fastwan21(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("fastwan21"), gates="fastvideo", seed=5)


@pytest.fixture(scope="module")
def wan_lora(wan21, tmp_path_factory):
    """fastwan's export of a rank-4 adapter (alpha 8) on the plain Wan, without its (zero,
    untrained) gates: a file as any diffusers-format Wan LoRA."""
    out = tmp_path_factory.mktemp("loras") / "style_a"
    save_lora(_adapted(wan21, gates=False), out, "generator", gates=False)
    assert sorted(p.name for p in out.iterdir()) == [LORA_FILE]
    return out


@pytest.fixture(scope="module")
def fast_lora(fastwan21, tmp_path_factory):
    """The same on the FastWan checkpoint, with a gate adapter: the folder has the gates."""
    out = tmp_path_factory.mktemp("loras") / "fast_style"
    save_lora(_adapted(fastwan21, gates=True), out, "generator")
    return out


@pytest.fixture(scope="module")
def original_wan_lora(tmp_path_factory):
    """A LoRA in the original Wan repository's key format (``diffusion_model.*``,
    ``lora_down`` / ``lora_up``, per-layer alpha), as LoRAs from elsewhere come."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for block in (0, 1):
        for layer, (fan_in, fan_out) in {
            "self_attn.q": (32, 32),
            "cross_attn.v": (32, 32),
            "ffn.0": (32, 64),
        }.items():
            key = f"diffusion_model.blocks.{block}.{layer}"
            tensors[f"{key}.lora_down.weight"] = 0.2 * torch.randn(4, fan_in, generator=g)
            tensors[f"{key}.lora_up.weight"] = 0.2 * torch.randn(fan_out, 4, generator=g)
            tensors[f"{key}.alpha"] = torch.tensor(8.0)
    path = tmp_path_factory.mktemp("other") / "someone.else.safetensors"
    save_file(tensors, str(path))
    return path


def _diffusers(path: Path, loras: list[tuple[Path, str, float]], seed: int) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    for file, name, _ in loras:
        folder, weight = (file, LORA_FILE) if file.is_dir() else (file.parent, file.name)
        pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name=name)
    pipe.set_adapters([n for _, n, _ in loras], [s for _, _, s in loras])
    return pipe(generator=torch.Generator().manual_seed(seed), **WAN).frames


def _wan_gen(path: Path) -> VideoGenerator:
    return VideoGenerator.from_pretrained(
        path, preset="wan2.1-t2v-1.3b", attention="dense", device="cpu"
    )


def test_a_lora_video_equals_diffusers_load_lora_weights_and_set_adapters(wan21, wan_lora):
    gen = _wan_gen(wan21)
    base = gen.generate(flow_shift=3.0, seed=11, **WAN).frames
    assert gen.load_lora(wan_lora, scale=0.7) == "style_a"  # named after its folder
    assert gen.loras == {"style_a": 0.7}
    ours = gen.generate(flow_shift=3.0, seed=11, **WAN).frames
    ref = _diffusers(wan21, [(wan_lora, "style_a", 0.7)], seed=11)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert np.abs(ours - base).max() > 1e-3  # the LoRA changes the video
    gen.unload_lora()
    assert gen.loras == {} and not list(lora_layers(gen.transformer))
    np.testing.assert_array_equal(gen.generate(flow_shift=3.0, seed=11, **WAN).frames, base)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers: 2 adapters
def test_a_lora_from_elsewhere_and_ours_add_up_as_in_diffusers(wan21, wan_lora, original_wan_lora):
    gen = _wan_gen(wan21)
    theirs = gen.load_lora(original_wan_lora, scale=0.5)
    assert theirs == "someone_else"  # dots are not allowed in peft's adapter names
    ours = gen.load_lora(wan_lora)
    assert gen.loras == {"someone_else": 0.5, "style_a": 1.0}
    gen.set_lora_scale(0.3, "style_a")
    assert gen.loras == {"someone_else": 0.5, "style_a": 0.3}
    frames = gen.generate(flow_shift=3.0, seed=2, **WAN).frames
    ref = _diffusers(wan21, [(original_wan_lora, "other", 0.5), (wan_lora, "ours", 0.3)], seed=2)
    np.testing.assert_allclose(frames, ref, rtol=0, atol=1e-6)
    gen.unload_lora(theirs)
    assert gen.loras == {ours: 0.3}


def test_vsa_video_with_a_lora_folder_equals_the_merged_model_and_unloads(fastwan21, fast_lora):
    gen = VideoGenerator.from_pretrained(
        fastwan21, preset="fastwan2.1-t2v-1.3b", sparsity=0.5, device="cpu"
    )
    assert gen.attention["mode"] == "vsa"
    base = gen.generate("a dog jumps over the ball", seed=4, **FAST)
    gates = gen.transformer.blocks[0].to_gate_compress.weight.detach().clone()
    name = gen.load_lora(fast_lora, scale=0.8)
    assert not torch.equal(gen.transformer.blocks[0].to_gate_compress.weight, gates)
    with_lora = gen.generate("a dog jumps over the ball", seed=4, **FAST)
    assert with_lora.timesteps == [1000.0, 757.0, 522.0]
    assert np.abs(with_lora.frames - base.frames).max() > 1e-3
    gen.unload_lora(name)
    assert torch.equal(gen.transformer.blocks[0].to_gate_compress.weight, gates)
    np.testing.assert_array_equal(gen.generate("a dog jumps over the ball", seed=4, **FAST).frames,
                                  base.frames)  # fmt: skip
    # merged: W + 0.8 B A in plain Linear layers, the folder's gates in place
    gen.load_lora(fast_lora, scale=0.8)
    merge_lora(gen.transformer)
    assert adapter_names(gen.transformer) == [] and gen.loras == {}
    merged = gen.generate("a dog jumps over the ball", seed=4, **FAST)
    np.testing.assert_allclose(merged.frames, with_lora.frames, rtol=0, atol=1e-5)


def test_default_names_never_clash_and_bad_calls_name_the_fix(wan21, wan_lora, tmp_path):
    gen = _wan_gen(wan21)
    file = wan_lora / LORA_FILE
    assert gen.load_lora(file) == "style_a"  # diffusers' file name: its folder's name
    assert gen.load_lora(wan_lora) == "style_a_2"
    assert gen.load_lora(wan_lora, adapter_name="mine") == "mine"
    assert list(gen.loras) == ["style_a", "style_a_2", "mine"]
    with pytest.raises(ValueError, match="already has an adapter 'mine'"):
        gen.load_lora(wan_lora, adapter_name="mine")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        gen.set_lora_scale(0.5, "nope")
    with pytest.raises(ValueError, match="finite number"):
        gen.set_lora_scale(float("nan"))
    with pytest.raises(ValueError, match="does not exist"):
        gen.load_lora(tmp_path / "missing")
    gen.unload_lora()
    with pytest.raises(ValueError, match="no LoRA adapter; load one with load_lora"):
        gen.set_lora_scale(1.0)


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture()
def main(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["fastwan.commands.generate"])
    return cli.main


@pytest.fixture()
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr("fastwan.pipeline.load_components", refuse)


def _cli(main, model: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "generate",
            "--model",
            str(model),
            "--preset",
            "fastwan2.1-t2v-1.3b",
            "--device",
            "cpu",
            "--max-sequence-length",
            "16",
            "--height",
            "32",
            "--width",
            "48",
            "--num-frames",
            "5",
            "--no-progress",
            "--prompt",
            "a cat",
            "--output",
            str(out),
            *extra,
        ]
    )


def test_generate_lora_flag_applies_it(main, fastwan21, fast_lora, tmp_path, capsys):
    assert _cli(main, fastwan21, tmp_path / "base.mp4") == 0
    assert "lora:" not in capsys.readouterr().out
    assert _cli(main, fastwan21, tmp_path / "lora.mp4", "--lora", f"{fast_lora}:0.5") == 0
    out = capsys.readouterr().out
    assert f"lora: fast_style from {fast_lora} (scale 0.5)" in out
    assert _cli(main, fastwan21, tmp_path / "two.mp4", "--lora", str(fast_lora),
                "--lora", str(fast_lora / LORA_FILE), "--lora-scale", "0.25") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "lora: fast_style from" in out and "lora: fast_style_2 from" in out
    assert out.count("(scale 0.25)") == 2
    base, _ = read_video(tmp_path / "base.mp4")
    lora, _ = read_video(tmp_path / "lora.mp4")
    assert base.shape == lora.shape == (5, 32, 48, 3)
    assert np.abs(base.astype(float) - lora.astype(float)).mean() > 1.0  # not the base video


def test_generate_lora_on_two_processes_equals_one(main, fastwan21, fast_lora, tmp_path, capsys):
    """`fastwan generate --num-gpus 2` (two CPU workers, gloo) runs the whole command (the
    report of what loaded, the LoRA in every worker) and makes the one-process video."""
    lora = ("--lora", f"{fast_lora}:0.5", "--seed", "3")
    assert _cli(main, fastwan21, tmp_path / "one.mp4", *lora) == 0
    one_out = capsys.readouterr().out
    assert _cli(main, fastwan21, tmp_path / "two.mp4", *lora, "--num-gpus", "2") == 0
    two_out = capsys.readouterr().out
    for out in (one_out, two_out):
        assert f"lora: fast_style from {fast_lora} (scale 0.5)" in out
        assert f"from {fastwan21}" in out  # the model line names the folder
    one, _ = read_video(tmp_path / "one.mp4")
    two, _ = read_video(tmp_path / "two.mp4")
    assert one.shape == two.shape == (5, 32, 48, 3)
    # the same video up to reduction order and the MP4's rounding
    assert np.abs(one.astype(float) - two.astype(float)).mean() < 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora", "{tmp}/nowhere.safetensors"], "--lora '.*nowhere.safetensors' does not exist"),
        (["--lora", "{tmp}/nowhere:0.5"], "--lora '.*nowhere' does not exist"),
        (["--lora", "{tmp}/notes.txt"], "is not a .safetensors file"),
        (["--num-gpus", "0"], "--num-gpus: num_gpus must be an int >= 1"),
        (["--num-gpus", "3"], "--num-gpus: num_gpus=3: the model's 2 attention heads"),
        (["--num-gpus", "2", "--cpu-offload"], "--num-gpus > 1 runs without --cpu-offload"),
    ],
)
def test_generate_refuses_bad_lora_and_num_gpus_before_any_weight_loads(
    main, fastwan21, tmp_path, capsys, no_loading, extra, message
):
    (tmp_path / "notes.txt").write_text("not a LoRA")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert _cli(main, fastwan21, tmp_path / "x.mp4", *extra) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit):  # argparse: not a finite number
        _cli(main, fastwan21, tmp_path / "x.mp4", "--lora-scale", "inf")
    assert "--lora-scale" in capsys.readouterr().err


# ------------------------------------------------------------------------- the 14B recipe

R14_LORA = ROOT / "recipes" / "wan2.1_t2v_14b_lora_sparse_distill.yaml"
GIB = 1024**3


@pytest.mark.parametrize("gpu_memory_gb", [141.0, 80.0])  # H200, A100-80G
def test_the_14b_lora_recipe_fits_one_node_of_8_gpus(gpu_memory_gb):
    from fastwan.config import load_recipe
    from fastwan.plan import plan_recipe

    recipe = load_recipe(R14_LORA)
    assert recipe.lora.rank == 64 and recipe.lora.shared_base and recipe.train.method == "dmd"
    assert recipe.parallel.world_size == 8 and recipe.vsa.sparsity == 0.9
    plan = plan_recipe(recipe, nodes=1, gpus_per_node=8, gpu_memory_gb=gpu_memory_gb)
    layout = plan.layout
    assert (layout.replicate, layout.shard, layout.sequence_parallel) == (1, 2, 4)
    assert plan.fits and plan.checkpointing == "selective"
    rows = {n.spec.role: n for n in plan.networks}
    assert list(rows) == ["student", "critic", "teacher"]
    # one bf16 copy of the 14B base (the teacher's row), sharded over 8 ranks
    assert rows["teacher"].params > 14e9 and rows["teacher"].param_bytes < 4 * GIB
    for role in ("student", "critic"):  # only the adapters: < 3% of the base
        assert 0 < rows[role].trainable_params < 0.03 * rows["teacher"].params
        assert rows[role].state_bytes < 1 * GIB
    # the same recipe trained in full holds three copies and states for two of them
    full = plan_recipe(
        load_recipe(R14_LORA, ["lora.rank=0"]), nodes=1, gpus_per_node=8,
        gpu_memory_gb=gpu_memory_gb,
    )  # fmt: skip
    assert full.state_bytes > 10 * plan.state_bytes
    assert full.total_bytes() > 3 * plan.total_bytes()


def test_fastwan_plan_prints_the_lora_recipe(capsys):
    import fastwan.cli

    args = ["plan", str(R14_LORA), "--nodes", "1", "--gpus-per-node", "8"]
    assert fastwan.cli.main([*args, "--gpu-memory-gb", "141"]) == 0
    out = capsys.readouterr().out
    assert "replicate 1 x shard 2 x sequence_parallel 4 = 8 GPUs" in out
    assert "verdict: fits" in out and "teacher" in out
