"""Image-to-video shards: FastVideo's pyarrow_schema_i2v, written with pyarrow as FastVideo
writes them (absent tensors as empty bytes / [] / ""), load as they are; fastwan's writer
produces the same schema; bad image conditions are named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _fastvideo_schema import FASTVIDEO_I2V, FASTVIDEO_T2V

from fastwan.data.dataset import LatentDataset, collate_samples
from fastwan.data.schema import SchemaError, arrow_schema, i2v_row, validate_schema

LATENT = (16, 3, 4, 6)  # [C, T, H, W]
CLIP = (257, 32)  # [N, D]


def _tensor(prefix, arr):
    if arr is None:  # FastVideo's way of leaving a feature out
        return {f"{prefix}_bytes": b"", f"{prefix}_shape": [], f"{prefix}_dtype": ""}
    return {
        f"{prefix}_bytes": arr.tobytes(),
        f"{prefix}_shape": list(arr.shape),
        f"{prefix}_dtype": str(arr.dtype),
    }


def _rows(n, clip=True, image=True, first_shape=LATENT, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"id": f"v{i}"}
        row.update(_tensor("vae_latent", rng.standard_normal(LATENT).astype(np.float32)))
        row.update(_tensor("text_embedding", rng.standard_normal((3, 8)).astype(np.float32)))
        row.update(
            _tensor("clip_feature", rng.standard_normal(CLIP).astype(np.float32) if clip else None)
        )
        row.update(
            _tensor("first_frame_latent", rng.standard_normal(first_shape).astype(np.float32))
        )
        pil = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) if image else None
        row.update(_tensor("pil_image", pil))
        row.update(
            file_name=f"v{i}.mp4", caption=f"c{i}", media_type="video", width=48, height=32,
            num_frames=9, duration_sec=9 / 16, fps=16.0,
        )  # fmt: skip
        rows.append(row)
    return rows


def _write(path, rows):
    schema = pa.schema([pa.field(n, t) for n, t in FASTVIDEO_I2V])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return rows


def _ds(path, **kw):
    return LatentDataset(path, text_length=4, normalize=False, image_condition=True, **kw)


def test_fastwan_writes_fastvideos_i2v_schema():
    assert [(f.name, f.type) for f in arrow_schema("i2v")] == FASTVIDEO_I2V


def test_fastvideo_i2v_shard_loads_as_it_is(tmp_path):
    rows = _write(tmp_path / "a.parquet", _rows(4))
    ds = _ds(tmp_path)
    sample = ds[2]
    want = np.frombuffer(rows[2]["first_frame_latent_bytes"], np.float32).reshape(LATENT)
    torch.testing.assert_close(sample["first_frame_latent"], torch.from_numpy(want))
    want = np.frombuffer(rows[2]["clip_feature_bytes"], np.float32).reshape(CLIP)
    torch.testing.assert_close(sample["clip_feature"], torch.from_numpy(want))
    pil = np.frombuffer(rows[2]["pil_image_bytes"], np.uint8).reshape(32, 48, 3)
    assert sample["pil_image"].dtype == torch.uint8 and (sample["pil_image"].numpy() == pil).all()
    batch = collate_samples([ds[0], ds[1]])
    assert batch["first_frame_latent"].shape == (2, *LATENT)
    assert batch["clip_feature"].shape == (2, *CLIP)
    # the same shard read as text-to-video data: the image condition is ignored
    plain = LatentDataset(tmp_path, text_length=4, normalize=False)
    assert "first_frame_latent" not in plain[0] and plain[0]["latents"].shape == LATENT


def test_absent_clip_features_as_fastvideo_writes_them(tmp_path):
    """Wan2.2 TI2V has no image encoder: FastVideo leaves clip_feature empty."""
    _write(tmp_path / "a.parquet", _rows(2, clip=False, image=False))
    sample = _ds(tmp_path)[0]
    assert "clip_feature" not in sample and "pil_image" not in sample
    assert sample["first_frame_latent"].shape == LATENT


def test_first_frame_latent_is_cut_with_the_latents(tmp_path):
    _write(tmp_path / "a.parquet", _rows(2))
    sample = _ds(tmp_path, latent_shape=(16, 2, 4, 6), temporal_crop="random")[1]
    assert sample["crop_start"] == 0  # the condition is the first frame: cut from there
    assert sample["latents"].shape == sample["first_frame_latent"].shape == (16, 2, 4, 6)


def test_bad_image_conditions_are_named(tmp_path):
    _write(tmp_path / "a.parquet", _rows(2, first_shape=(16, 3, 2, 6)))
    with pytest.raises(SchemaError, match=r"first_frame_latent_shape.*\[16, 3, 2, 6\].*--task i2v"):
        _ds(tmp_path)[0]
    t2v = tmp_path / "t2v"
    t2v.mkdir()
    rows = [{k: v for k, v in r.items() if k in dict(FASTVIDEO_T2V)} for r in _rows(1)]
    schema = pa.schema([pa.field(n, t) for n, t in FASTVIDEO_T2V])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), t2v / "a.parquet")
    with pytest.raises(SchemaError, match="first_frame_latent_bytes.*--task i2v"):
        _ds(t2v)
    with pytest.raises(ValueError, match="image_condition needs i2v shards"):
        LatentDataset(t2v, text_only=True, image_condition=True)


def test_i2v_row_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    row = i2v_row(
        clip_feature=None,
        first_frame_latent=torch.randn(LATENT),
        pil_image=rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
        id="x", latent=torch.randn(LATENT), text_embedding=torch.randn(3, 8), caption="c",
        file_name="x.mp4", width=48, height=32, num_frames=9, fps=16,
    )  # fmt: skip
    schema = arrow_schema("i2v")
    assert list(row) == schema.names
    pq.write_table(pa.Table.from_pylist([row], schema=schema), tmp_path / "x.parquet")
    assert validate_schema(pq.read_schema(tmp_path / "x.parquet"), "x") == "i2v"
    sample = _ds(tmp_path)[0]
    torch.testing.assert_close(
        sample["first_frame_latent"],
        torch.from_numpy(
            np.frombuffer(row["first_frame_latent_bytes"], np.float32).reshape(LATENT)
        ),
    )
    with pytest.raises(ValueError, match=r"clip_feature must be \[N, D\]"):
        i2v_row(clip_feature=torch.zeros(3), first_frame_latent=torch.zeros(LATENT), id="x")
