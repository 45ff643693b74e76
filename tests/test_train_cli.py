"""``fastwan distill`` / ``export`` end to end on a tiny Wan folder and a tiny parquet set.

Latents ``[16, 2, 8, 8]`` (token grid (2, 4, 4)), VSA tile (1, 2, 2) at sparsity 0.5, text
length 16; two DMD steps, a resume to step 3, export, then a 2-step generation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_wan import build_tiny_wan, write_random_video_shard
from safetensors.torch import load_file

from fastwan.train.checkpoint import read_marker, read_trainer_state

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
    assert read_marker(ckpt)["networks"] == ["critic", "generator"]
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    state = read_trainer_state(ckpt)
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
    state3 = read_trainer_state(tmp_path / "run" / "checkpoint-3")
    assert state3["step"] == 3 and [r["step"] for r in state3["history"]] == [1, 2, 3]
    assert state3["history"][:2] == state["history"]

    # export the EMA: the exported transformer holds exactly the checkpoint's EMA shadow
    export = tmp_path / "exported"
    ckpt3 = tmp_path / "run" / "checkpoint-3"
    assert _main(["export", str(ckpt3), "--out", str(export), "--ema"]) == 0
    saved = load_file(str(export / "transformer" / "diffusion_pytorch_model.safetensors"))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt3 / "dcp", tmp_path / "ckpt3.pt")  # DCP's own reader, all pieces
    pieces = torch.load(tmp_path / "ckpt3.pt", weights_only=False)
    shadow, live = pieces["ema.generator"]["shadow"], pieces["model.generator"]
    for name, value in shadow.items():
        assert torch.equal(saved[name], value), name
    assert any(not torch.equal(saved[k], live[k]) for k in shadow)
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
    assert read_marker(ckpt)["networks"] == ["generator"]  # no critic
    state = read_trainer_state(ckpt)
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
    from fastwan.config import load_recipe
    from fastwan.train.build import build_trainer

    with pytest.raises(ValueError, match="parallel.world_size"):
        build_trainer(load_recipe(recipe, ["parallel.world_size=4", "parallel.replicate=4",
                                           "train.global_batch_size=4"]))  # fmt: skip
    assert _main(["finetune", recipe]) == 2
    assert "train.method is 'dmd'" in capsys.readouterr().err
    assert _main(["distill", recipe, "train.max_steps", "--no-progress"]) == 2
    assert "overrides look like --section.key=VALUE" in capsys.readouterr().err
    assert _main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a trainer checkpoint" in capsys.readouterr().err


# ------------------------------------------- checks before any model loads (issue 15)


def _no_model_loads(monkeypatch):
    import fastwan.models.loading as loading

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before the run was checked")

    monkeypatch.setattr(loading, "load_transformer", refuse)


def test_bad_resume_and_recipes_are_refused_before_models_load(
    tmp_path, wan_dir, data_dir, capsys, monkeypatch
):
    import json

    import yaml

    recipe = _recipe(tmp_path, wan_dir, data_dir)
    with monkeypatch.context() as m:
        _no_model_loads(m)
        assert _main(["distill", recipe, "--resume", "checkpoint-999", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "resume checkpoint 'checkpoint-999' does not exist" in err, err
        assert "there is no complete checkpoint under" in err and "--resume latest" in err
        # a YAML string in an int field
        quoted = tmp_path / "quoted.yaml"
        quoted.write_text(Path(recipe).read_text().replace("max_steps: 2", 'max_steps: "600"'))
        assert _main(["distill", str(quoted), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "train.max_steps: must be an integer, got the string '600'" in err, err
        # an output dir that cannot be written
        (tmp_path / "file").write_text("x")
        bad_out = f"--train.output_dir={tmp_path / 'file' / 'run'}"
        assert _main(["distill", recipe, bad_out, "--no-progress"]) == 2
        assert "train.output_dir" in capsys.readouterr().err

    run = tmp_path / "run"
    assert _main(["distill", recipe, "--no-progress"]) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:  # an unsafe change: refused, naming it, before loading
        _no_model_loads(m)
        rc = _main(["distill", recipe, "--resume", "latest", "--vsa.sparsity=0.25",
                    "--train.max_steps=3", "--no-progress"])  # fmt: skip
        assert rc == 2
        err = capsys.readouterr().err
        assert "vsa.sparsity: cannot change on resume" in err and "0.5 -> 0.25" in err, err
        assert "--vsa.sparsity=0.5" in err
    # safe changes: applied and recorded; the run's recipe.yaml keeps what it started with
    rc = _main(["distill", recipe, "--resume", "checkpoint-2", "--train.max_steps=3",
                "--optim.generator.lr=5e-4", "--no-progress"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "recipe changes: train.max_steps 2 -> 3; optim.generator.lr 0.001 -> 0.0005" in out.err
    started = yaml.safe_load((run / "recipe.yaml").read_text())
    assert started["train"]["max_steps"] == 2 and started["optim"]["generator"]["lr"] == 1e-3
    (change,) = [json.loads(x) for x in (run / "recipe_changes.jsonl").read_text().splitlines()]
    assert change["changes"]["optim.generator.lr"] == {"old": 1e-3, "new": 5e-4}
    now = yaml.safe_load((run / "checkpoint-3" / "recipe.yaml").read_text())
    assert now["optim"]["generator"]["lr"] == 5e-4 and now["train"]["max_steps"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3 and summary["complete"] is True
    assert summary["data"]["rows_read"] == 3 and summary["data"]["rows_skipped"] == 0
    assert "data: 3 rows read, 0 skipped" in out.out


def test_77_frame_latents_train_at_the_recipes_frames_exactly_on_resume(tmp_path, wan_dir, capsys):
    (tmp_path / "long").mkdir()
    long_data = write_random_video_shard(tmp_path / "long", latent=(16, 20, 8, 8))  # 77 frames
    recipe = _recipe(tmp_path, wan_dir, long_data)
    common = ["finetune", recipe, "--train.method=flow", "--train.ema_decay=null",
              "--data.num_frames=61", "--no-progress"]  # fmt: skip
    full = ["--train.output_dir=" + str(tmp_path / "full"), "--train.max_steps=3"]
    assert _main(common + full) == 0, capsys.readouterr().err
    half = "--train.output_dir=" + str(tmp_path / "half")
    assert _main(common + [half, "--train.max_steps=2"]) == 0
    assert _main(common + [half, "--train.max_steps=3", "--resume", "latest"]) == 0
    capsys.readouterr()
    a = read_trainer_state(tmp_path / "full" / "checkpoint-3")
    b = read_trainer_state(tmp_path / "half" / "checkpoint-3")
    losses = [[r["generator_loss"] for r in s["history"]] for s in (a, b)]
    assert losses[0] == losses[1] and all(math.isfinite(x) for x in losses[0])
    # the recipe's 61 frames are 16 latent frames: 20-frame latents of other sizes do not fit
    rc = _main(common + [half, "--data.height=32", "--train.max_steps=4", "--resume", "latest"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.height: cannot change on resume" in err
    rc = _main(common + ["--train.output_dir=" + str(tmp_path / "c"), "--data.height=32"])
    err = capsys.readouterr().err
    assert rc == 2 and "no row of" in err and "s.parquet row 0" in err, err
    assert "data.num_frames / data.height / data.width" in err
