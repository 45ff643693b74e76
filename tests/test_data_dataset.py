"""LatentDataset on FastVideo-schema parquet written directly with pyarrow, training a tiny
Wan transformer on it; corrupt data; the distributed resumable sampler."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _fastvideo_schema import FASTVIDEO_T2V as FASTVIDEO_T2V_FIELDS
from _tiny_wan import TEXT_DIM, tiny_transformer

from fastwan.data.dataset import LatentDataset, collate_samples
from fastwan.data.sampler import DistributedSampler, ResumableLoader, build_train_loader
from fastwan.data.schema import SchemaError
from fastwan.diffusion.flow import add_noise
from fastwan.methods.losses import flow_matching_loss
from fastwan.train.config import DataConfig

LATENT = (16, 2, 4, 6)  # [C, T, H, W] of the tiny Wan transformer (16 channels, patch 1x2x2)
MEAN = [0.1 * (c % 4) for c in range(16)]
STD = [0.5 + 0.1 * (c % 3) for c in range(16)]


def _fastvideo_rows(start: int, count: int, latent_shape=LATENT, text_dtype="float32"):
    """Rows as FastVideo's preprocessing writes them (numpy tobytes, str(dtype))."""
    rng = np.random.default_rng(start)
    rows = []
    for i in range(start, start + count):
        latent = rng.standard_normal(latent_shape).astype(np.float32)
        length = 3 + i % 4
        text = rng.standard_normal((length, TEXT_DIM)).astype(np.float32)
        if text_dtype == "bfloat16":
            text_bytes = torch.from_numpy(text).to(torch.bfloat16).view(torch.int16).numpy()
            text_bytes = text_bytes.tobytes()
        else:
            text_bytes = text.tobytes()
        rows.append(
            {
                "id": f"video_{i}",
                "vae_latent_bytes": latent.tobytes(),
                "vae_latent_shape": list(latent.shape),
                "vae_latent_dtype": str(latent.dtype),
                "text_embedding_bytes": text_bytes,
                "text_embedding_shape": list(text.shape),
                "text_embedding_dtype": text_dtype,
                "file_name": f"video_{i}.mp4",
                "caption": f"caption {i}",
                "media_type": "video",
                "width": 48,
                "height": 32,
                "num_frames": 5,
                "duration_sec": 5 / 16,
                "fps": 16.0,
            }
        )
    return rows


FASTVIDEO_T2V = pa.schema(FASTVIDEO_T2V_FIELDS)


def _write(path, rows, row_group_size=None, schema=FASTVIDEO_T2V):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def fastvideo_dir(tmp_path):
    """Two FastVideo-schema files: multi-row row groups, one with bf16 text embeddings."""
    root = tmp_path / "ds"
    _write(root / "worker_0" / "data_0.parquet", _fastvideo_rows(0, 5), row_group_size=2)
    _write(root / "worker_1" / "data_0.parquet", _fastvideo_rows(5, 3, text_dtype="bfloat16"))
    return root


def _expected(rows):
    out = {}
    for r in rows:
        z = np.frombuffer(r["vae_latent_bytes"], np.float32).reshape(LATENT)
        out[r["id"]] = torch.from_numpy(z.copy())
    return out


def test_fastvideo_parquet_loads_and_trains(fastvideo_dir):
    ds = LatentDataset(fastvideo_dir, text_length=8, latents_mean=MEAN, latents_std=STD)
    assert len(ds) == 8
    raw = _expected(_fastvideo_rows(0, 5) + _fastvideo_rows(5, 3, text_dtype="bfloat16"))
    mean = torch.tensor(MEAN).view(-1, 1, 1, 1)
    std = torch.tensor(STD).view(-1, 1, 1, 1)
    for i in (0, 3, 4, 6):  # rows in several row groups and both files
        s = ds[i]
        assert s["id"] == f"video_{i}" and s["caption"] == f"caption {i}"
        torch.testing.assert_close(s["latents"], (raw[s["id"]] - mean) / std)
        n = 3 + i % 4
        assert s["text_embedding"].shape == (8, TEXT_DIM)
        assert s["text_mask"].tolist() == [True] * n + [False] * (8 - n)
        assert torch.all(s["text_embedding"][n:] == 0) and torch.all(s["text_embedding"][:n] != 0)
    # bf16 text embedding decoded exactly
    rows = _fastvideo_rows(5, 3)
    t6 = np.frombuffer(rows[1]["text_embedding_bytes"], np.float32).reshape(5, TEXT_DIM)
    torch.testing.assert_close(
        ds[6]["text_embedding"][:5], torch.from_numpy(t6.copy()).to(torch.bfloat16).float()
    )

    # "trains": one forward + backward of a tiny Wan transformer on a batch of it
    sampler = DistributedSampler(len(ds), batch_size=2, seed=0)
    batch = next(iter(ResumableLoader(ds, sampler)))
    assert batch["latents"].shape == (2, *LATENT) and batch["text_embedding"].shape == (2, 8, 32)
    g = torch.Generator().manual_seed(0)
    model = tiny_transformer().train()
    x0 = batch["latents"]  # [B, C, T, H, W]
    eps = torch.randn(x0.shape, generator=g)
    s = torch.rand(2, generator=g)
    v = model(
        hidden_states=add_noise(x0, eps, s),
        timestep=s * 1000,
        encoder_hidden_states=batch["text_embedding"],
        return_dict=False,
    )[0]
    loss = flow_matching_loss(v, x0, eps)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and loss > 0
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


def test_text_only_and_normalize_errors(tmp_path, fastvideo_dir):
    schema = pa.schema([(f.name, f.type) for f in FASTVIDEO_T2V if not f.name.startswith("vae")])
    rows = [{k: v for k, v in r.items() if k in schema.names} for r in _fastvideo_rows(0, 3)]
    text_dir = tmp_path / "text"
    _write(text_dir / "t.parquet", rows, schema=schema)
    ds = LatentDataset(text_dir, text_length=8, text_only=True)
    assert "latents" not in ds[0] and ds[2]["text_mask"].sum() == 5
    # a video dataset read as text-only
    assert "latents" not in LatentDataset(fastvideo_dir, text_length=8, text_only=True)[0]
    with pytest.raises(SchemaError, match=r"t\.parquet: missing column 'vae_latent_bytes'"):
        LatentDataset(text_dir, text_length=8)
    with pytest.raises(ValueError, match="latents_mean and latents_std are needed"):
        LatentDataset(fastvideo_dir, text_length=8)
    ds = LatentDataset(fastvideo_dir, text_length=8, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with pytest.raises(ValueError, match="16 channels but latents_mean/std have 4"):
        ds[0]
    ds = LatentDataset(fastvideo_dir, text_length=4, normalize=False)
    with pytest.raises(ValueError, match="has 6 tokens, more than text_length=4"):
        ds[3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable parquet rows"):
        LatentDataset(tmp_path / "empty")


def test_cfg_dropout_is_deterministic_per_epoch(fastvideo_dir):
    empty = torch.full((2, TEXT_DIM), 0.5)
    with pytest.raises(ValueError, match="empty_prompt_embedding.npy does not exist"):
        LatentDataset(fastvideo_dir, text_length=8, normalize=False, cfg_dropout=0.5)
    np.save(fastvideo_dir / "empty_prompt_embedding.npy", empty.numpy())
    kw = dict(text_length=8, normalize=False, cfg_dropout=0.5, seed=3)
    a, b = LatentDataset(fastvideo_dir, **kw), LatentDataset(fastvideo_dir, **kw)
    keys = [(i, e) for e in range(6) for i in range(8)]
    drops_a = [a[k]["cfg_dropped"] for k in keys]
    assert drops_a == [b[k]["cfg_dropped"] for k in keys]  # same seed, same draws
    assert 0.3 < np.mean(drops_a) < 0.7
    per_index = np.array(drops_a).reshape(6, 8)
    assert (per_index.min(0) != per_index.max(0)).any()  # varies over epochs
    other = LatentDataset(fastvideo_dir, **dict(kw, seed=4))
    assert drops_a != [other[k]["cfg_dropped"] for k in keys]
    k = keys[drops_a.index(True)]
    s = a[k]
    assert s["text_mask"].tolist() == [True, True] + [False] * 6
    torch.testing.assert_close(s["text_embedding"][:2], empty)
    kept = a[keys[drops_a.index(False)]]
    assert not torch.all(kept["text_embedding"][:2] == 0.5)


def test_corrupt_rows_and_files(tmp_path):
    rows = _fastvideo_rows(0, 4)
    rows[1]["vae_latent_bytes"] = rows[1]["vae_latent_bytes"][:-8]  # truncated latent
    root = tmp_path / "ds"
    bad_rows = _write(root / "a.parquet", rows)
    ds = LatentDataset(root, text_length=8, normalize=False)
    with pytest.raises(SchemaError, match=r"a\.parquet row 1: column 'vae_latent_bytes' holds"):
        ds[1]
    skip = LatentDataset(root, text_length=8, normalize=False, on_error="skip")
    s = skip[1]  # replaced by the next good row, and reported
    assert s["id"] == "video_2" and len(s["skipped"]) == 1 and "a.parquet row 1" in s["skipped"][0]
    batch = collate_samples([skip[0], skip[1]])
    assert batch["id"] == ["video_0", "video_2"] and len(batch["skipped"]) == 1

    (root / "b.parquet").write_bytes(b"PAR1 garbage that is not parquet")
    with pytest.raises(SchemaError, match=r"b\.parquet: unreadable parquet file.*on_error='skip'"):
        LatentDataset(root, text_length=8, normalize=False)
    with pytest.warns(UserWarning, match="b.parquet"):
        skip = LatentDataset(root, text_length=8, normalize=False, on_error="skip")
    assert len(skip.skipped_files) == 1 and len(skip) == 4
    assert skip.files == [bad_rows]


def test_collate_names_rows_of_different_latent_shapes(tmp_path):
    root = tmp_path / "ds"
    _write(root / "a.parquet", _fastvideo_rows(0, 1))
    _write(root / "b.parquet", _fastvideo_rows(1, 1, latent_shape=(16, 3, 4, 6)))
    ds = LatentDataset(root, text_length=8, normalize=False)
    with pytest.raises(
        ValueError,
        match=r"\[16, 2, 4, 6\] in .*a\.parquet row 0 \(id 'video_0'\)"
        r"; \[16, 3, 4, 6\] in .*b\.parquet row 0",
    ):
        collate_samples([ds[0], ds[1]])


# --------------------------------------------------------------------------- sampler


def test_sampler_splits_data_parallel_and_shares_within_sp_groups():
    world, sp, n, bs = 8, 2, 37, 3
    samplers = [
        DistributedSampler.for_rank(
            n, rank=r, world_size=world, sequence_parallel=sp, batch_size=bs, seed=7
        )
        for r in range(world)
    ]
    orders = [list(s) for s in samplers]
    for r in range(0, world, sp):  # ranks of one SP group see the same samples
        assert orders[r] == orders[r + 1]
    dp = [orders[r] for r in range(0, world, sp)]
    flat = [i for o in dp for i, _ in o]
    assert len(flat) == len(set(flat)) == (n // (bs * 4)) * bs * 4  # disjoint, tail dropped
    assert all(len(o) == samplers[0].samples_per_epoch == 9 for o in dp)
    assert all(e == 0 for o in dp for _, e in o)
    # same seed -> same order; another epoch or seed -> another
    s = DistributedSampler(n, batch_size=bs, seed=7)
    assert [i for i, _ in s] == s.epoch_indices(0) != s.epoch_indices(1)
    assert s.epoch_indices(0) == DistributedSampler(n, batch_size=bs, seed=7).epoch_indices(0)
    assert s.epoch_indices(0) != DistributedSampler(n, batch_size=bs, seed=8).epoch_indices(0)
    # drop_last=False wraps around so every rank has full batches
    w = DistributedSampler(10, batch_size=3, dp_size=2, dp_rank=1, drop_last=False)
    assert w.samples_per_epoch == 6 and len(set(w.epoch_indices(0))) == 6
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DistributedSampler(5, batch_size=3, dp_size=2)
    with pytest.raises(ValueError, match="must divide world_size"):
        DistributedSampler.for_rank(10, rank=0, world_size=6, sequence_parallel=4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_loader_replays_the_uninterrupted_order(fastvideo_dir, num_workers):
    np.save(fastvideo_dir / "empty_prompt_embedding.npy", np.ones((1, TEXT_DIM), np.float32))
    ds = LatentDataset(fastvideo_dir, text_length=8, normalize=False, cfg_dropout=0.3, seed=1)

    def loader():
        return ResumableLoader(
            ds, DistributedSampler(len(ds), batch_size=3, seed=5), num_workers=num_workers
        )

    steps = 7  # 2 batches per epoch: crosses three epoch boundaries
    full = loader()
    reference = [b for b, _ in zip(full, range(steps))]
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]  # workers have prefetched beyond this
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [b for b, _ in zip(resumed, range(steps - 3))]
    for a, b in zip(reference, head + tail):
        assert a["id"] == b["id"] and a["epoch"] == b["epoch"]
        assert torch.equal(a["latents"], b["latents"])
        assert torch.equal(a["cfg_dropped"], b["cfg_dropped"])
        assert torch.equal(a["text_embedding"], b["text_embedding"])
    epochs = [b["epoch"][0] for b in reference]
    assert epochs == [0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="batch_size=3 but this sampler has 2"):
        DistributedSampler(len(ds), batch_size=2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=5 but this sampler has 6"):
        DistributedSampler(len(ds), batch_size=3, seed=6).load_state_dict(state)


def test_build_train_loader_from_the_data_config(fastvideo_dir):
    cfg = DataConfig(path=str(fastvideo_dir), num_workers=0, text_length=8)
    kw = dict(world_size=4, sequence_parallel=2, micro_batch_size=2, seed=3,
              latents_mean=MEAN, latents_std=STD)  # fmt: skip
    loaders = [build_train_loader(cfg, rank=r, **kw) for r in range(4)]
    batches = [next(iter(loader)) for loader in loaders]
    assert batches[0]["id"] == batches[1]["id"] and batches[2]["id"] == batches[3]["id"]
    assert not set(batches[0]["id"]) & set(batches[2]["id"])
    assert batches[0]["latents"].shape == (2, *LATENT)
    assert batches[0]["text_embedding"].shape == (2, 8, TEXT_DIM)
    state = loaders[0].state_dict()
    assert state["position"] == 2
    # one rank's state (saved once in a checkpoint) resumes every rank
    resumed = build_train_loader(cfg, rank=3, **kw)
    resumed.load_state_dict(state)
    expected = loaders[3].sampler.epoch_indices(0)[2:4]
    assert next(iter(resumed))["index"].tolist() == expected
    with pytest.raises(ValueError, match="data.path is null"):
        build_train_loader(DataConfig(), rank=0, **kw)
