"""Metric sinks (TensorBoard, wandb), the trainer's tracker / validator hooks, loss plots."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM, tiny_transformer
from PIL import Image

from fastwan.config import ModelConfig, Recipe, TrainConfig, VSAConfig
from fastwan.methods.flow import FlowMethod
from fastwan.train.plots import loss_series, plot_loss_curves
from fastwan.train.tracking import TensorBoardTracker, Trackers, build_trackers
from fastwan.train.trainer import LOSS_PLOT_FILE, Trainer


def _recipe(out, **train) -> Recipe:
    base = dict(
        method="flow",
        max_steps=3,
        mixed_precision="fp32",
        log_interval=1,
        checkpoint_interval=0,
        output_dir=str(out),
        report_to=[],
    )
    return Recipe(model=ModelConfig(teacher="tiny"), train=TrainConfig(**{**base, **train}))


def _batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "latents": torch.randn(1, 16, 2, 8, 8, generator=g),
            "text_embedding": torch.randn(1, MAX_TEXT_LEN, TEXT_DIM, generator=g),
        }
        for _ in range(n)
    ]


class _Recorder:
    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []
        self.images: list[tuple[int, dict]] = []
        self.closed = 0

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_images(self, images, step):
        self.images.append((step, dict(images)))

    def close(self):
        self.closed += 1


class _FakeValidator:
    def __init__(self):
        self.steps: list[int] = []

    def __call__(self, trainer):
        self.steps.append(trainer.step)
        return types.SimpleNamespace(images={"validation/grid": np.zeros((4, 6, 3), np.uint8)})


def _trainer(out, interval, **kw):
    torch.manual_seed(0)
    method = FlowMethod(tiny_transformer(num_layers=1), VSAConfig(enabled=False))
    tracker, validator, lines = _Recorder(), _FakeValidator(), []
    recipe = _recipe(out, validation_interval=interval, **kw)
    trainer = Trainer(
        method, recipe, _batches(), log_fn=lines.append, validator=validator, tracker=tracker
    )
    return trainer, tracker, validator, lines


def test_trainer_feeds_tracker_and_validator(tmp_path):
    trainer, tracker, validator, lines = _trainer(tmp_path, 2)
    trainer.train()
    assert validator.steps == [2, 3]  # every 2 steps and at the end
    steps = [s for s, m in tracker.metrics if "train/generator_loss" in m]
    assert steps == [1, 2, 3]
    first = next(m for s, m in tracker.metrics if s == 1 and "train/generator_loss" in m)
    record = trainer.history[0]
    assert first["train/generator_loss"] == record["generator_loss"]
    assert first["train/generator_grad_norm"] == record["generator_grad_norm"]
    assert first["train/generator_lr"] == record["generator_lr"]
    assert first["train/generator_timestep"] == record["generator_timestep"]
    assert first["train/sparsity"] == 0.0 and first["train/step_time"] == record["step_time"]
    assert first["train/samples_per_s"] == pytest.approx(1 / record["step_time"])
    assert "train/step" not in first
    assert "samples_per_s" not in record  # throughput stays out of the (resumable) history
    assert [s for s, _ in tracker.images] == [2, 3]
    assert [s for s, m in tracker.metrics if "validation/seconds" in m] == [2, 3]
    assert tracker.closed == 1  # closed after the last step
    assert "samples/s" in lines[0]
    with Image.open(tmp_path / LOSS_PLOT_FILE) as img:
        assert img.format == "PNG"

    # validation_interval 0: only at the end; train() in pieces ends the same way
    trainer, tracker, validator, _ = _trainer(tmp_path / "b", 0)
    trainer.train(1)
    trainer.train(2)
    assert validator.steps == [3] and tracker.closed == 1
    with pytest.raises(ValueError, match="no validator"):
        Trainer(trainer.method, trainer.recipe, _batches()).validate()


def test_tensorboard_tracker_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardTracker(tmp_path / "logs")
    tb.log_metrics({"train/a": 1.5, "train/flag": True, "train/nan": math.nan}, 3)
    tb.log_metrics({"train/a": 0.5}, 4)
    grid = np.zeros((10, 20, 3), np.uint8)
    grid[:, :10, 0] = 255
    tb.log_images({"validation/grid": grid}, 4)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["scalars"] == ["train/a"]  # bools and non-finite values dropped
    assert [(e.step, e.value) for e in acc.Scalars("train/a")] == [(3, 1.5), (4, 0.5)]
    (image,) = acc.Images("validation/grid")
    assert (image.step, image.width, image.height) == (4, 20, 10)
    with pytest.raises(ValueError, match="uint8"):
        TensorBoardTracker(tmp_path / "x").log_images({"g": np.zeros((4, 4))}, 1)


def test_tensorboard_resumed_run_replaces_later_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    crashed = TensorBoardTracker(tmp_path)
    for step in range(1, 5):  # logged steps 1..4, but its last checkpoint was step 2
        crashed.log_metrics({"train/loss": float(step)}, step)
    crashed.close()
    resumed = TensorBoardTracker(tmp_path)
    for step in (3, 4):
        resumed.log_metrics({"train/loss": 10.0 * step}, step)
    resumed.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_build_trackers_and_missing_wandb(tmp_path, monkeypatch):
    assert build_trackers(_recipe(tmp_path)).sinks == []
    sinks = build_trackers(_recipe(tmp_path, report_to=["tensorboard"])).sinks
    assert [type(s).__name__ for s in sinks] == ["TensorBoardTracker"]
    assert sinks[0].log_dir == tmp_path / "logs"
    sinks[0].close()
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match=r"train\.report_to.*pip install wandb"):
        build_trackers(_recipe(tmp_path, report_to=["wandb"]))


def test_wandb_tracker_logs_to_its_run(tmp_path, monkeypatch):
    calls: dict = {"logs": [], "finished": 0}

    class _Run:
        def log(self, data, step):
            calls["logs"].append((step, data))

        def finish(self):
            calls["finished"] += 1

    class _Image:
        def __init__(self, array):
            self.array = array

    def init(**kwargs):
        calls["init"] = kwargs
        return _Run()

    fake = types.ModuleType("wandb")
    fake.init, fake.Image = init, _Image
    monkeypatch.setitem(sys.modules, "wandb", fake)
    recipe = _recipe(tmp_path / "myrun", report_to=["wandb"], tracker_project="proj")
    trackers = build_trackers(recipe)
    assert calls["init"]["project"] == "proj" and calls["init"]["name"] == "myrun"
    assert calls["init"]["config"]["train"]["report_to"] == ["wandb"]
    trackers.log_metrics({"train/loss": 2.0, "train/inf": math.inf}, 5)
    trackers.log_images({"validation/grid": np.ones((2, 3, 3), np.uint8)}, 5)
    trackers.close()
    (step, metrics), (img_step, media) = calls["logs"]
    assert (step, metrics) == (5, {"train/loss": 2.0})
    assert img_step == 5 and media["validation/grid"].array.shape == (2, 3, 3)
    assert calls["finished"] == 1


def test_trackers_fan_out():
    a, b = _Recorder(), _Recorder()
    both = Trackers([a, b])
    both.log_metrics({"x": 1.0}, 2)
    both.close()
    assert a.metrics == b.metrics == [(2, {"x": 1.0})] and a.closed == b.closed == 1


def test_plot_loss_curves(tmp_path):
    history = [
        {"step": i + 1, "critic_loss": 1.0 / (i + 1), "step_time": 0.1}
        | ({"generator_loss": 2.0 - 0.01 * i} if i % 5 == 0 else {})
        for i in range(60)
    ]
    history[3]["critic_loss"] = math.nan
    series = loss_series(history)
    assert list(series) == ["critic_loss", "generator_loss"]
    assert len(series["critic_loss"][0]) == 59 and 4 not in series["critic_loss"][0]
    assert series["generator_loss"][0] == list(range(1, 61, 5))
    path = plot_loss_curves(history, tmp_path / "sub" / "loss.png", title="run")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (600, 2 * 260)  # 6 in x 2.6 in per loss
        assert np.asarray(img.convert("L")).std() > 10  # something was drawn
    one = plot_loss_curves(history, tmp_path / "one.png", keys=["generator_loss"], dpi=50)
    with Image.open(one) as img:
        assert img.size == (300, 130)
    with pytest.raises(ValueError, match="no finite loss"):
        plot_loss_curves([{"step": 1, "step_time": 0.1}], tmp_path / "none.png")
    with pytest.raises(ValueError, match="dpi"):
        plot_loss_curves(history, tmp_path / "bad.png", dpi=0)
