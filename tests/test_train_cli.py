"""``fastwan distill`` / ``export`` end to end on a tiny Wan folder and a tiny parquet set.

Latents ``[16, 2, 8, 8]`` (token grid (2, 4, 4)), VSA tile (1, 2, 2) at sparsity 0.5, text
length 16; two DMD steps, a resume to step 3, export, then a 2-step generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tiny_wan import build_tiny_wan, write_random_video_shard
from safetensors.torch import load_file

LATENT = (16, 2, 8, 8)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan"), num_layers=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_random_video_shard(tmp_path_factory.mktemp("data"), latent=LATENT)


def _main(argv: list[str]) -> int:
    """``fastwan.cli.main`` with only this module's commands registered."""
    import fastwan.cli as cli

    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ["fastwan.commands.train"]
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = saved


def _recipe(tmp_path, wan_dir, data_dir) -> str:
    text = f"""
model: {{teacher: {wan_dir}, dtype: fp32, teacher_dtype: fp32}}
train:
  method: dmd
  max_steps: 2
  mixed_precision: fp32
  seed: 3
  log_interval: 1
  checkpoint_interval: 0
  ema_decay: 0.5
  output_dir: {tmp_path / "run"}
data: {{path: {data_dir}, num_workers: 0, text_length: 16, num_frames: 5, height: 64, width: 64}}
optim:
  generator: {{lr: 1.0e-3}}
  critic: {{lr: 1.0e-3}}
dmd: {{generator_update_interval: 1, guidance_scale: 3.0, flow_shift: 3.0}}
vsa: {{sparsity: 0.5, tile_size: [1, 2, 2], backend: torch}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return str(path)


def test_distill_resume_export_generate(tmp_path, wan_dir, data_dir, capsys):
    recipe = _recipe(tmp_path, wan_dir, data_dir)
    rc = _main(["distill", recipe, "--train.max_steps=2", "--negative-prompt", "low quality"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "generator.safetensors").is_file() and (ckpt / "critic.safetensors").is_file()
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["history"]) == 2
    for record in state["history"]:
        for key in ("generator_loss", "critic_loss"):
            assert math.isfinite(record[key]), record
    assert "done: 2 steps" in out.out and "generator_loss" in out.out
    assert "2/2" in out.err  # the progress bar reached the last step

    # resume: continues at step 3 with the saved history (options after the overrides too)
    rc = _main(
        [
            "distill",
            recipe,
            "--train.max_steps=3",
            "--train.checkpoint_interval=1",
            "--resume",
            "latest",
            "--no-progress",
            "--negative-prompt",
            "low quality",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "at step 2" in out.out and "done: 1 steps" in out.out
    state3 = torch.load(tmp_path / "run" / "checkpoint-3" / "trainer_state.pt", weights_only=True)
    assert state3["step"] == 3 and [r["step"] for r in state3["history"]] == [1, 2, 3]
    assert state3["history"][:2] == state["history"]

    # export the EMA: the exported transformer holds exactly the checkpoint's EMA shadow
    export = tmp_path / "exported"
    ckpt3 = tmp_path / "run" / "checkpoint-3"
    assert _main(["export", str(ckpt3), "--out", str(export), "--ema"]) == 0
    saved = load_file(str(export / "transformer" / "diffusion_pytorch_model.safetensors"))
    for name, value in state3["ema"]["shadow"].items():
        assert torch.equal(saved[name], value), name
    live = load_file(str(ckpt3 / "generator.safetensors"))
    assert any(not torch.equal(saved[k], live[k]) for k in state3["ema"]["shadow"])
    assert (export / "vae").is_dir() and (export / "model_index.json").is_file()
    capsys.readouterr()

    from fastwan.pipeline import VideoGenerator

    gen = VideoGenerator.from_pretrained(str(export), preset="fastwan2.1-t2v-1.3b", device="cpu")
    result = gen.generate(
        "a red cat runs",
        height=32,
        width=32,
        num_frames=5,
        timesteps=[1000, 500],
        seed=0,
        max_sequence_length=16,
    )
    assert result.video.shape == (5, 32, 32, 3) and np.isfinite(result.video).all()


def test_finetune_runs_flow(tmp_path, wan_dir, data_dir, capsys):
    recipe = _recipe(tmp_path, wan_dir, data_dir)
    rc = _main(["finetune", recipe, "--train.method=flow", "--train.max_steps=2",
                "--train.ema_decay=null", "--vsa.decay_rate=0.25", "--no-progress"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "generator.safetensors").is_file()
    assert not (ckpt / "critic.safetensors").exists()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["method"] == "flow"
    assert [r["sparsity"] for r in state["history"]] == [0.0, 0.25]
    assert all(math.isfinite(r["generator_loss"]) for r in state["history"])


def test_bad_inputs_fail_clearly(tmp_path, wan_dir, data_dir, capsys):
    recipe = _recipe(tmp_path, wan_dir, data_dir)
    rc = _main(["distill", recipe, "--parallel.world_size=2", "--parallel.replicate=2",
                "--train.global_batch_size=2"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "parallel.world_size is 2" in err and "torchrun --nproc_per_node=2" in err
    from fastwan.train.build import build_trainer
    from fastwan.train.config import load_recipe

    with pytest.raises(ValueError, match="parallel.world_size"):
        build_trainer(load_recipe(recipe, ["parallel.world_size=4", "parallel.replicate=4",
                                           "train.global_batch_size=4"]))  # fmt: skip
    assert _main(["finetune", recipe]) == 2
    assert "train.method is 'dmd'" in capsys.readouterr().err
    assert _main(["distill", recipe, "train.max_steps", "--no-progress"]) == 2
    assert "overrides look like --section.key=VALUE" in capsys.readouterr().err
    assert _main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "has no generator.safetensors" in capsys.readouterr().err
