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

from fastwan.config import DataConfig
from fastwan.data.dataset import LatentDataset, collate_samples
from fastwan.data.sampler import DistributedSampler, ResumableLoader, build_train_loader
from fastwan.data.schema import SchemaError
from fastwan.diffusion.flow import add_noise
from fastwan.methods.losses import flow_matching_loss

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
    assert s["id"] == "video_2" and len(s["skipped"]) == 1
    assert s["skipped"][0]["reason"] == "decode_error" and s["skipped"][0]["row"] == 1
    assert "a.parquet row 1: column 'vae_latent_bytes'" in s["skipped"][0]["message"]
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


# ------------------------------------------------- clip size, bad values (issues 14, 15)

LONG = (16, 20, 4, 6)  # 77 frames -> 20 latent frames (Wan-Syn's), 4 x 6 latent pixels
TRAIN = (16, 16, 4, 6)  # the recipe's 61 frames -> 16 latent frames


def _long_dir(tmp_path, n=8):
    root = tmp_path / "long"
    _write(root / "a.parquet", _fastvideo_rows(0, n, latent_shape=LONG), row_group_size=3)
    return root


def _raw(row, shape):
    return torch.from_numpy(
        np.frombuffer(row["vae_latent_bytes"], np.float32).reshape(shape).copy()
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_long_latents_are_cropped_in_time_identically_on_resume(tmp_path, num_workers):
    root = _long_dir(tmp_path)
    rows = {r["id"]: r for r in _fastvideo_rows(0, 8, latent_shape=LONG)}
    kw = dict(text_length=8, normalize=False, latent_shape=TRAIN, seed=11)
    ds = LatentDataset(root, **kw)

    def loader():
        sampler = DistributedSampler(len(ds), batch_size=2, seed=5)
        return ResumableLoader(ds, sampler, num_workers=num_workers)

    steps = 9  # 4 batches per epoch: crosses two epoch boundaries
    reference = [b for b, _ in zip(loader(), range(steps))]
    starts = set()
    for batch in reference:
        assert batch["latents"].shape == (2, *TRAIN)
        for i, (row_id, start) in enumerate(zip(batch["id"], batch["crop_start"])):
            assert 0 <= start <= LONG[1] - TRAIN[1]
            want = _raw(rows[row_id], LONG)[:, start : start + TRAIN[1]]  # latent-aligned
            assert torch.equal(batch["latents"][i], want)
            starts.add(start)
    assert len(starts) > 1  # the start is drawn, not fixed
    # one sample's start differs between epochs (drawn per (seed, epoch, index))
    per_key = {(b["index"][i].item(), b["epoch"][i]): b["crop_start"][i]
               for b in reference for i in range(2)}  # fmt: skip
    by_index: dict[int, set] = {}
    for (index, _epoch), start in per_key.items():
        by_index.setdefault(index, set()).add(start)
    assert any(len(v) > 1 for v in by_index.values())
    # interrupted after 3 batches, resumed in a fresh loader: the same crops
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    tail = [b for b, _ in zip(resumed, range(steps - 3))]
    for a, b in zip(reference, head + tail):
        assert a["id"] == b["id"] and a["crop_start"] == b["crop_start"]
        assert torch.equal(a["latents"], b["latents"])
    # another seed draws other starts; "first" always crops at 0
    other = LatentDataset(root, **dict(kw, seed=12))
    assert [other[(i, 0)]["crop_start"] for i in range(8)] != [ds[(i, 0)]["crop_start"]
                                                               for i in range(8)]  # fmt: skip
    head_crop = LatentDataset(root, **kw, temporal_crop="first")
    s = head_crop[(3, 1)]
    assert s["crop_start"] == 0 and torch.equal(s["latents"], _raw(rows["video_3"], LONG)[:, :16])
    # latents of exactly the recipe's length are not cropped
    exact = LatentDataset(root, **dict(kw, latent_shape=LONG))[(2, 0)]
    assert exact["crop_start"] == 0 and torch.equal(exact["latents"], _raw(rows["video_2"], LONG))


def test_other_sizes_are_skipped_and_counted_or_refused(tmp_path):
    root = tmp_path / "mixed"
    _write(root / "a.parquet", _fastvideo_rows(0, 4, latent_shape=LONG))
    _write(root / "b.parquet", _fastvideo_rows(4, 1, latent_shape=(16, 20, 4, 8)))  # wider
    _write(root / "c.parquet", _fastvideo_rows(5, 1, latent_shape=(16, 12, 4, 6)))  # 45 frames
    kw = dict(text_length=8, normalize=False, latent_shape=TRAIN)
    # on_error: raise refuses at open, naming the rows, the files and the fix
    with pytest.raises(SchemaError) as err:
        LatentDataset(root, **kw)
    msg = str(err.value)
    assert "2 of 6 rows" in msg and "shape_mismatch 1, too_short 1" in msg
    assert "b.parquet row 0: column 'vae_latent_shape' is [16, 20, 4, 8]" in msg
    assert "data.num_frames / data.height / data.width" in msg and "on_error='skip'" in msg
    # on_error: skip: skipped (replaced by the next good row) and counted per reason
    with pytest.warns(UserWarning, match="2 of 6 rows .* skipped and counted"):
        ds = LatentDataset(root, **kw, on_error="skip")
    assert ds.shape_skips == {"shape_mismatch": 1, "too_short": 1}
    wide, short = ds[4], ds[5]
    assert [s["reason"] for s in wide["skipped"]] == ["shape_mismatch"]
    assert [s["reason"] for s in short["skipped"]] == ["too_short"]
    assert short["skipped"][0]["file"].endswith("c.parquet") and short["skipped"][0]["row"] == 0
    assert "12 latent frames, fewer than the recipe's 16" in short["skipped"][0]["message"]
    assert wide["latents"].shape == TRAIN and short["latents"].shape == TRAIN  # replacements
    batch = collate_samples([ds[0], wide, short])
    assert [s["reason"] for s in batch["skipped"]] == ["shape_mismatch", "too_short"]
    # ... refused when that is more than data.max_skip_fraction of the rows
    cfg = DataConfig(path=str(root), num_workers=0, text_length=8, on_error="skip")
    kw_loader = dict(rank=0, world_size=1, micro_batch_size=1, seed=0, latents_mean=MEAN,
                     latents_std=STD, latent_shape=TRAIN)  # fmt: skip
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"data\.max_skip_fraction: 2 of the 6 rows"),
    ):
        build_train_loader(cfg, **kw_loader)
    cfg.max_skip_fraction = 0.5
    with pytest.warns(UserWarning):
        assert len(build_train_loader(cfg, **kw_loader).dataset) == 6
    # every row mismatches: refused whatever on_error, with the row, the file and the fix
    for on_error in ("raise", "skip"):
        with pytest.raises(SchemaError) as err:
            LatentDataset(root / "b.parquet", **kw, on_error=on_error)
        msg = str(err.value)
        assert "no row of" in msg and "all 1 rows have latents of another size" in msg
        assert "b.parquet row 0" in msg and "data.num_frames / data.height / data.width" in msg


@pytest.mark.parametrize("value", [1e30, float("inf"), float("nan")])
def test_absurd_latents_name_the_row(tmp_path, value):
    rows = _fastvideo_rows(0, 4)
    latent = np.frombuffer(rows[2]["vae_latent_bytes"], np.float32).copy()
    latent[7] = value
    rows[2]["vae_latent_bytes"] = latent.tobytes()
    root = tmp_path / "ds"
    _write(root / "a.parquet", rows)
    ds = LatentDataset(root, text_length=8, latents_mean=MEAN, latents_std=STD)
    with pytest.raises(SchemaError) as err:
        ds[2]
    msg = str(err.value)
    assert "a.parquet row 2: column 'vae_latent_bytes' holds" in msg, msg
    assert "re-encode the clip" in msg and "on_error='skip'" in msg
    assert err.value.reason == "non_finite"
    skip = LatentDataset(root, text_length=8, latents_mean=MEAN, latents_std=STD, on_error="skip")
    s = skip[2]
    assert s["id"] == "video_3" and [x["reason"] for x in s["skipped"]] == ["non_finite"]
    assert torch.isfinite(s["latents"]).all()
    # the bound is a recipe field: null only refuses NaN / inf
    if value == 1e30:
        loose = LatentDataset(root, text_length=8, normalize=False, max_abs_latent=None)
        assert loose[2]["latents"].abs().max() == pytest.approx(1e30, rel=1e-6)
        big = LatentDataset(root, text_length=8, normalize=False, max_abs_latent=1e31)
        assert big[2]["id"] == "video_2"


def test_unreadable_files_past_the_skip_fraction_are_refused(tmp_path):
    root = tmp_path / "ds"
    _write(root / "a.parquet", _fastvideo_rows(0, 4))
    (root / "b.parquet").write_bytes(b"PAR1 garbage that is not parquet")
    cfg = DataConfig(path=str(root), num_workers=0, text_length=8, on_error="skip")
    kw = dict(rank=0, world_size=1, micro_batch_size=1, seed=0, latents_mean=MEAN,
              latents_std=STD)  # fmt: skip
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            ValueError, match=r"data\.max_skip_fraction: 1 of the 2 parquet files .*b\.parquet"
        ),
    ):
        build_train_loader(cfg, **kw)
    cfg.max_skip_fraction = 0.5
    with pytest.warns(UserWarning):
        assert len(build_train_loader(cfg, **kw).dataset) == 4
