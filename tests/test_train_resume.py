"""Resuming with a changed recipe (issue 15 item 3) and a checkpoint that does not exist
(item 9): the checkpoint's own recipe is compared field by field; unsafe changes are
refused before anything loads, safe ones (the learning rate among them) are applied to the
optimizer and its schedule and recorded. A tiny Wan transformer, the flow method, CPU."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM, tiny_transformer

from fastwan.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    OptimConfigs,
    Recipe,
    TrainConfig,
    VSAConfig,
    dump_recipe,
)
from fastwan.methods.flow import FlowMethod
from fastwan.methods.schedules import cosine_multiplier
from fastwan.train.checkpoint_io import CHECKSUMS_FILE, COMPLETE_MARKER
from fastwan.train.trainer import (
    RECIPE_CHANGES_FILE,
    RECIPE_FILE,
    Trainer,
    resolve_resume,
    saved_recipe,
)


def _recipe(out, *, steps=4, lr=1e-3, sparsity=0.5, **train) -> Recipe:
    return Recipe(
        model=ModelConfig(teacher="tiny"),
        train=TrainConfig(
            **{
                "method": "flow",
                "max_steps": steps,
                "mixed_precision": "fp32",
                "seed": 5,
                "log_interval": 1,
                "checkpoint_interval": 0,
                "output_dir": str(out),
                "report_to": [],
                **train,
            }
        ),  # fmt: skip
        optim=OptimConfigs(generator=OptimConfig(lr=lr, schedule="cosine", warmup_steps=1)),
        vsa=VSAConfig(sparsity=sparsity, tile_size=(1, 2, 2), backend="torch"),
    )


class _Batches:
    """Endless fixed batches with a resumable position (like ResumableLoader)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [
            {
                "latents": torch.randn(1, 16, 2, 8, 8, generator=g),
                "text_embedding": torch.randn(1, MAX_TEXT_LEN, TEXT_DIM, generator=g),
            }
            for _ in range(3)
        ]
        self.position = 0

    def __iter__(self):
        while True:
            self.position += 1
            yield self.items[(self.position - 1) % 3]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _trainer(recipe, lines=None):
    torch.manual_seed(0)
    method = FlowMethod(tiny_transformer(num_layers=1), recipe.vsa)
    log = lines.append if lines is not None else (lambda _line: None)
    return Trainer(method, recipe, _Batches(), log_fn=log)


def _first_half(out, **kw):
    trainer = _trainer(_recipe(out, **kw))
    trainer.train(2)
    return trainer.save_checkpoint()


def test_checkpoint_holds_the_recipe_it_trained_with(tmp_path):
    ckpt = _first_half(tmp_path)
    saved, source = saved_recipe(ckpt)
    assert source == str(ckpt / RECIPE_FILE)
    assert saved["optim"]["generator"]["lr"] == 1e-3 and saved["vsa"]["sparsity"] == 0.5


@pytest.mark.parametrize(
    "change, field, old_new",
    [
        ({"sparsity": 0.75}, "vsa.sparsity", "0.5 -> 0.75"),
        ({"seed": 6}, "train.seed", "5 -> 6"),
        ({"ema_decay": 0.9}, "train.ema_decay", "None -> 0.9"),
    ],
)
def test_unsafe_changes_are_refused_before_anything_loads(tmp_path, change, field, old_new):
    ckpt = _first_half(tmp_path)
    trainer = _trainer(_recipe(tmp_path, **change))
    before = {k: v.clone() for k, v in trainer.method.model.state_dict().items()}

    def must_not_load(path):
        raise AssertionError("the checkpoint was loaded before the recipe was checked")

    trainer._load_checkpoint = must_not_load
    with pytest.raises(ConfigError) as err:
        trainer.resume()
    msg = str(err.value)
    assert msg.startswith(f"{field}: cannot change on resume from {str(ckpt)!r}"), msg
    assert f"{field}: {old_new}" in msg and "start a new run in another train.output_dir" in msg
    assert f"--{field}=" in msg  # the revert, spelled as an override
    assert trainer.step == 0
    assert all(torch.equal(v, before[k]) for k, v in trainer.method.model.state_dict().items())
    assert not (tmp_path / RECIPE_CHANGES_FILE).exists()


def test_a_new_lr_is_applied_to_the_optimizer_and_schedule_and_recorded(tmp_path):
    _first_half(tmp_path)  # lr 1e-3, cosine over 4 steps, warmup 1
    lines: list[str] = []
    resumed = _trainer(_recipe(tmp_path, lr=4e-4, log_interval=2), lines)
    assert resumed.resume() is not None and resumed.step == 2
    # the next update uses the new base lr at the schedule's saved position
    expected = 4e-4 * cosine_multiplier(2, 1, 4)
    assert resumed.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(expected)
    assert resumed.schedulers["generator"].base_lrs == [4e-4]
    resumed.train()
    lrs = [r["generator_lr"] for r in resumed.history]
    assert lrs[:2] == [pytest.approx(1e-3 * cosine_multiplier(s, 1, 4)) for s in (0, 1)]
    assert lrs[2:] == [pytest.approx(4e-4 * cosine_multiplier(s, 1, 4)) for s in (2, 3)]
    # logged and recorded, old -> new
    line = next(x for x in lines if "recipe changes" in x)
    assert "optim.generator.lr 0.001 -> 0.0004" in line and "train.log_interval 1 -> 2" in line
    assert "the next generator update uses lr" in line and RECIPE_CHANGES_FILE in line
    (record,) = [json.loads(x) for x in (tmp_path / RECIPE_CHANGES_FILE).read_text().splitlines()]
    assert record["step"] == 2 and record["checkpoint"].endswith("checkpoint-2")
    assert record["changes"]["optim.generator.lr"] == {"old": 1e-3, "new": 4e-4}
    assert "optim.generator.lr" in record["applied"]
    # the checkpoints keep saying what trained: checkpoint-2 the old lr, checkpoint-4 the new
    assert saved_recipe(tmp_path / "checkpoint-2")[0]["optim"]["generator"]["lr"] == 1e-3
    final = resumed.save_checkpoint()
    assert saved_recipe(final)[0]["optim"]["generator"]["lr"] == 4e-4


def test_a_longer_run_respreads_the_cosine_schedule(tmp_path):
    _first_half(tmp_path)
    resumed = _trainer(_recipe(tmp_path, steps=6))
    resumed.resume()
    assert resumed.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(
        1e-3 * cosine_multiplier(2, 1, 6)
    )
    resumed.train()
    assert resumed.step == 6


def test_unchanged_resume_records_nothing_and_stays_exact(tmp_path):
    full = _trainer(_recipe(tmp_path / "full"))
    full.train()
    _first_half(tmp_path / "half")
    second = _trainer(_recipe(tmp_path / "half"))
    second.resume()
    second.train()
    assert [r["generator_loss"] for r in second.history] == [
        r["generator_loss"] for r in full.history
    ]
    assert not (tmp_path / "half" / RECIPE_CHANGES_FILE).exists()


def test_a_checkpoint_before_the_first_step_changes_nothing_and_resumes_exactly(tmp_path):
    # saving at step 0 (no optimizer state yet) leaves the run as it was, and resuming it
    # gives the uninterrupted run: no optimizer state appears that the run did not have
    full = _trainer(_recipe(tmp_path / "full"))
    full.train()
    early = _trainer(_recipe(tmp_path / "early"))
    ckpt = early.save_checkpoint()
    assert ckpt.name == "checkpoint-0" and not early.optimizers["generator"].state
    early.train()
    resumed = _trainer(_recipe(tmp_path / "early"))
    assert resumed.resume(ckpt) == ckpt and resumed.step == 0
    assert not resumed.optimizers["generator"].state
    resumed.train()
    for run in (early, resumed):
        assert [r["generator_loss"] for r in run.history] == [
            r["generator_loss"] for r in full.history
        ]
        for name, value in full.networks["generator"].state_dict().items():
            assert torch.equal(run.networks["generator"].state_dict()[name], value), name


def test_checkpoint_without_its_recipe_uses_the_runs_with_its_changes(tmp_path):
    ckpt = _first_half(tmp_path)
    # as written by an older fastwan: no recipe.yaml, and no checksums either
    (ckpt / RECIPE_FILE).unlink()
    (ckpt / CHECKSUMS_FILE).unlink()
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    marker.pop("checksums_sha256", None)
    (ckpt / COMPLETE_MARKER).write_text(json.dumps(marker))
    dump_recipe(_recipe(tmp_path), tmp_path / RECIPE_FILE)
    change = {"step": 1, "changes": {"train.max_steps": {"old": 4, "new": 6}}}
    later = {"step": 2, "changes": {"optim.generator.lr": {"old": 1e-3, "new": 1.0}}}
    (tmp_path / RECIPE_CHANGES_FILE).write_text(json.dumps(change) + "\n" + json.dumps(later))
    saved, source = saved_recipe(ckpt)
    assert RECIPE_CHANGES_FILE in source
    assert saved["train"]["max_steps"] == 6  # changed before step 2: trained into checkpoint-2
    assert saved["optim"]["generator"]["lr"] == 1e-3  # changed at step 2: not yet
    with pytest.raises(ConfigError, match=r"vsa\.sparsity: 0\.5 -> 0\.75"):
        _trainer(_recipe(tmp_path, steps=6, sparsity=0.75)).resume(ckpt)
    resumed = _trainer(_recipe(tmp_path, steps=6))
    assert resumed.resume(ckpt) == ckpt and resumed.step == 2


def test_missing_or_incomplete_checkpoints_are_named(tmp_path):
    ckpt = _first_half(tmp_path)
    with pytest.raises(ValueError) as err:
        resolve_resume("checkpoint-999", tmp_path)
    msg = str(err.value)
    assert "resume checkpoint 'checkpoint-999' does not exist" in msg
    assert "the complete checkpoints under" in msg and "checkpoint-2" in msg
    assert "--resume latest" in msg
    assert resolve_resume("checkpoint-2", tmp_path) == tmp_path / "checkpoint-2"  # by name
    assert resolve_resume(str(ckpt), tmp_path / "elsewhere") == ckpt
    assert resolve_resume("latest", tmp_path / "empty") is None
    assert resolve_resume(None, tmp_path) is None
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(ckpt), tmp_path)
    with pytest.raises(ValueError, match="there is no complete checkpoint under"):
        resolve_resume("checkpoint-7", tmp_path)
