"""Skipped rows are counted and bounded (issue 15 item 2): a shard with its middle rows
corrupted, latents of 1e30, trained under ``data.on_error: skip`` / ``raise`` with the real
LatentDataset and resumable loader, a tiny Wan transformer and the flow method (CPU)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM, tiny_transformer

from fastwan.config import DataConfig, ModelConfig, Recipe, TrainConfig, VSAConfig
from fastwan.data.sampler import build_train_loader
from fastwan.data.schema import SchemaError, arrow_schema, video_row
from fastwan.methods.flow import FlowMethod
from fastwan.train.trainer import SkippedRowsError, Trainer

LATENT = (16, 2, 8, 8)  # C, T, H, W of the tiny transformer (a 2 x 4 x 4 token grid)
BAD = range(6, 27)  # 21 of 32 rows: the middle of the shard


def _shard(root, n=32, truncated=(), huge=()):
    """One parquet shard of ``n`` rows; ``truncated`` rows lose 8 bytes of their latent,
    ``huge`` rows hold a 1e30."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        latent = rng.standard_normal(LATENT).astype(np.float32)
        if i in huge:
            latent.flat[5] = 1e30
        row = video_row(
            id=f"clip_{i}",
            latent=latent,
            text_embedding=rng.standard_normal((3 + i % 4, TEXT_DIM)).astype(np.float32),
            caption=f"caption {i}",
            file_name=f"clip_{i}.mp4",
            width=64,
            height=64,
            num_frames=5,
            fps=16.0,
        )
        if i in truncated:
            row["vae_latent_bytes"] = row["vae_latent_bytes"][:-8]
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema("video")), root / "s.parquet")
    return root


def _setup(out, data_dir, *, steps, on_error="skip", max_skip_fraction=0.05, micro=4, tracker=None):
    recipe = Recipe(
        model=ModelConfig(teacher="tiny"),
        train=TrainConfig(
            method="flow",
            max_steps=steps,
            global_batch_size=micro,
            micro_batch_size=micro,
            mixed_precision="fp32",
            seed=3,
            log_interval=1,
            checkpoint_interval=0,
            output_dir=str(out),
            report_to=[],
        ),  # fmt: skip
        data=DataConfig(
            path=str(data_dir),
            num_workers=0,
            text_length=MAX_TEXT_LEN,
            on_error=on_error,
            max_skip_fraction=max_skip_fraction,
            num_frames=5,
            height=64,
            width=64,
        ),  # fmt: skip
        vsa=VSAConfig(enabled=False),
    )
    loader = build_train_loader(recipe.data, rank=0, world_size=1, micro_batch_size=micro,
                                seed=recipe.train.seed, latents_mean=[0.0] * 16,
                                latents_std=[1.0] * 16, latent_shape=LATENT)  # fmt: skip
    torch.manual_seed(0)
    method = FlowMethod(tiny_transformer(num_layers=1), recipe.vsa)
    lines: list[str] = []
    trainer = Trainer(method, recipe, loader, log_fn=lines.append, tracker=tracker)
    return trainer, lines


class _Recorder:
    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_images(self, images, step):
        pass

    def close(self):
        pass


def test_corrupt_middle_rows_are_counted_and_stop_the_run_naming_them(tmp_path):
    data = _shard(tmp_path / "data", truncated=BAD)
    tracker = _Recorder()
    trainer, lines = _setup(tmp_path / "run", data, steps=4, tracker=tracker)
    order = trainer.data.sampler.epoch_indices(0)
    with pytest.raises(SkippedRowsError) as err:
        trainer.train()
    # the last step's check: 4 batches of 4 rows read, the bad ones among them skipped
    bad_read = [i for i in order[:16] if i in BAD]
    assert len(bad_read) > 1
    msg = str(err.value)
    assert msg.startswith(f"data.max_skip_fraction: {len(bad_read)} of the 16 rows read")
    assert f"decode_error {len(bad_read)}" in msg and "> 5.0%" in msg
    rows = ", ".join(map(str, sorted(bad_read)[:10]))
    assert f"s.parquet (rows {rows}" in msg, msg
    assert "column 'vae_latent_bytes' holds" in msg and "raise data.max_skip_fraction" in msg
    assert trainer.step == 3  # stopped before the last update
    summary = trainer.data_summary()
    assert summary["rows_read"] == 16 and summary["rows_skipped"] == len(bad_read)
    assert summary["skipped_by_reason"] == {
        "decode_error": len(bad_read), "non_finite": 0, "shape_mismatch": 0, "too_short": 0
    }  # fmt: skip
    (file,) = summary["skipped_rows_by_file"]
    assert file.endswith("s.parquet") and summary["skipped_rows_by_file"][file] == sorted(bad_read)
    # the console: each skipped row named (the first few), and the running count
    named = [line for line in lines if line.startswith("step ") and ": skipped " in line]
    assert named and "s.parquet row" in named[0] and "(decode_error)" in named[0]
    consoles = [line for line in lines if line.startswith("step 3/4")]
    skipped3 = len([i for i in order[:12] if i in BAD])
    assert f"skipped {skipped3}/12 rows" in consoles[0] and "decode_error" in consoles[0]
    # the tracker: cumulative counts per reason, the fraction, the rows read
    last = [m for s, m in tracker.metrics if s == 3][0]
    assert last["data/rows_read"] == 12 and last["data/skipped_decode_error"] == skipped3
    assert last["data/skip_fraction"] == pytest.approx(skipped3 / 12)
    assert last["data/skipped_non_finite"] == 0 and last["data/skipped"] == skipped3


def test_counts_within_the_limit_survive_a_resume(tmp_path):
    data = _shard(tmp_path / "data", truncated=(9,), huge=(20,))
    full, _ = _setup(tmp_path / "full", data, steps=8, max_skip_fraction=0.2)
    full.train()
    want = full.data_summary()
    assert want["rows_read"] == 32
    assert want["skipped_by_reason"]["decode_error"] == 1
    assert want["skipped_by_reason"]["non_finite"] == 1  # the 1e30 row: named, not a NaN loss
    assert all(np.isfinite(r["generator_loss"]) for r in full.history)

    first, _ = _setup(tmp_path / "half", data, steps=8, max_skip_fraction=0.2)
    first.train(4)
    first.save_checkpoint()
    second, _ = _setup(tmp_path / "half", data, steps=8, max_skip_fraction=0.2)
    assert second.resume() is not None
    assert second.data_summary()["rows_read"] == 16
    second.train()
    assert second.data_summary() == want
    assert [r["generator_loss"] for r in second.history] == [
        r["generator_loss"] for r in full.history
    ]


def test_the_limit_is_not_enforced_on_too_few_rows_before_the_last_step(tmp_path):
    data = _shard(tmp_path / "data", truncated=(0, 1, 2, 3))  # 4 of 32 rows: 12.5%
    trainer, _ = _setup(tmp_path / "run", data, steps=8, max_skip_fraction=0.05)
    trainer.train(7)  # 28 rows read: too few to tell 12.5% from 5% -- no stop yet
    assert trainer.data_summary()["rows_skipped"] >= 1
    with pytest.raises(SkippedRowsError, match="of the 32 rows read by step 8"):
        trainer.train(1)
    zero, _ = _setup(tmp_path / "zero", data, steps=8, max_skip_fraction=0.0)
    with pytest.raises(SkippedRowsError, match=r"% > 0\.0%"):
        zero.train()  # max_skip_fraction 0: the first skipped row stops the run
    assert zero.step < 8


def test_absurd_latents_under_on_error_raise_name_the_row_not_a_nan_loss(tmp_path):
    data = _shard(tmp_path / "data", huge=(5,))
    trainer, _ = _setup(tmp_path / "run", data, steps=8, on_error="raise")
    with pytest.raises(SchemaError) as err:  # not FloatingPointError
        trainer.train()
    msg = str(err.value)
    assert "s.parquet row 5: column 'vae_latent_bytes' holds values of magnitude up to 1e+30" in msg
    assert "re-encode the clip" in msg and "data.on_error: skip" in msg


def test_tensorboard_receives_the_skip_counts(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastwan.train.tracking import TensorBoardTracker

    data = _shard(tmp_path / "data", truncated=(0, 1, 2, 3, 4, 5, 6, 7))
    tracker = TensorBoardTracker(tmp_path / "logs")
    trainer, _ = _setup(tmp_path / "run", data, steps=2, max_skip_fraction=1.0, tracker=tracker)
    trainer.train()
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"data/skipped", "data/skipped_decode_error", "data/skip_fraction"} <= set(tags)
    final = events.Scalars("data/skipped_decode_error")[-1]
    assert final.step == 2 and final.value == trainer.data_summary()["rows_skipped"]
