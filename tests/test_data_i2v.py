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
from fastwan.data.schema import SchemaError, arrow_schema, i2v_row, i2v_text_row, validate_schema

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


# ------------------------------------------------- text-only image-to-video (data-free)


def _text_rows(n, first_shape=LATENT, clip=True):
    g = torch.Generator().manual_seed(3)
    return [
        i2v_text_row(
            id=f"p{i}",
            text_embedding=torch.randn(2 + i, 8, generator=g),
            caption=f"c{i}",
            clip_feature=torch.randn(CLIP, generator=g) if clip else None,
            first_frame_latent=torch.randn(first_shape, generator=g),
            pil_image=torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8, generator=g),
            file_name=f"imgs/{i}.png",
            width=48,
            height=32,
            num_frames=9,
        )  # fmt: skip
        for i in range(n)
    ]


def _write_text(path, rows):
    schema = arrow_schema("i2v_text")
    assert list(rows[0]) == schema.names
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return rows


def test_text_only_i2v_rows_load_with_their_condition(tmp_path):
    rows = _write_text(tmp_path / "a.parquet", _text_rows(3))
    assert validate_schema(pq.read_schema(tmp_path / "a.parquet"), "a") == "i2v_text"
    ds = LatentDataset(tmp_path, text_length=4, text_only=True, image_condition=True)
    s = ds[2]
    assert "latents" not in s and s["caption"] == "c2" and s["text_mask"].sum() == 4
    want = np.frombuffer(rows[2]["first_frame_latent_bytes"], np.float32).reshape(LATENT)
    torch.testing.assert_close(s["first_frame_latent"], torch.from_numpy(want))
    assert s["clip_feature"].shape == CLIP and s["pil_image"].dtype == torch.uint8
    batch = collate_samples([ds[0], ds[1]])
    assert batch["first_frame_latent"].shape == (2, *LATENT) and "latents" not in batch
    # the recipe's latent shape: an I2V condition is cut to its frames, checked otherwise
    cut = LatentDataset(
        tmp_path, text_length=4, text_only=True, image_condition=True, latent_shape=(16, 2, 4, 6)
    )
    assert cut[0]["first_frame_latent"].shape == (16, 2, 4, 6)
    wrong = LatentDataset(
        tmp_path, text_length=4, text_only=True, image_condition=True, latent_shape=(16, 3, 8, 6)
    )
    with pytest.raises(SchemaError, match=r"first_frame_latent_shape.*recipe's.*--task i2v"):
        wrong[0]
    # plain text-only reading ignores the image; a latent reader refuses the shard
    assert "first_frame_latent" not in LatentDataset(tmp_path, text_length=4, text_only=True)[0]
    with pytest.raises(SchemaError, match="missing column 'vae_latent_bytes'.*text_only: true"):
        _ds(tmp_path)


def test_ti2v_condition_of_one_latent_frame_is_kept(tmp_path):
    """Wan2.2 TI2V's condition is the image's latent alone: [C, 1, h, w], never cut."""
    _write_text(tmp_path / "a.parquet", _text_rows(2, first_shape=(16, 1, 4, 6), clip=False))
    ds = LatentDataset(
        tmp_path, text_length=4, text_only=True, image_condition=True, latent_shape=(16, 3, 4, 6)
    )
    assert ds[0]["first_frame_latent"].shape == (16, 1, 4, 6) and "clip_feature" not in ds[0]


def test_i2v_shards_serve_data_free_i2v_and_t2v_shards_are_refused(tmp_path):
    _write(tmp_path / "a.parquet", _rows(2))
    s = LatentDataset(tmp_path, text_length=4, text_only=True, image_condition=True)[1]
    assert "latents" not in s and s["first_frame_latent"].shape == LATENT
    text = tmp_path / "text"
    text.mkdir()
    schema = pa.schema([pa.field(n, t) for n, t in FASTVIDEO_T2V[:1] + FASTVIDEO_T2V[4:7]])
    rows = [{k: r[k] for k in schema.names} | {"caption": "c"} for r in _rows(1)]
    schema = schema.append(pa.field("caption", pa.string()))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), text / "t.parquet")
    with pytest.raises(SchemaError, match="a text shard.*image_condition needs i2v shards"):
        LatentDataset(text, text_only=True, image_condition=True)


# ------------------------------------------------------------- image + prompt files


def _images(root, n=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 30, 3), dtype=np.uint8)).save(
            root / "imgs" / f"{i}.png"
        )


def test_image_prompt_files(tmp_path):
    import json

    from fastwan.data.sources import load_image_prompts

    _images(tmp_path)
    lines = [
        {"image": "imgs/0.png", "prompt": "a cat"},
        {"image": "imgs/1.png", "prompt": "a cat"},  # same prompt, other image: other id
        {"image": str(tmp_path / "imgs" / "2.png"), "text": "a dog", "id": "dog"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    items = load_image_prompts(tmp_path / "pairs.jsonl")
    assert [i.prompt for i in items] == ["a cat", "a cat", "a dog"]
    assert items[0].image == tmp_path / "imgs" / "0.png" and items[0].image_name == "imgs/0.png"
    assert items[0].id != items[1].id and items[2].id == "dog"
    assert [i.id for i in load_image_prompts(tmp_path / "pairs.jsonl")] == [i.id for i in items]
    # CSV, images relative to --images
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.csv").write_text("image,prompt\n0.png,a cat\n")
    (item,) = load_image_prompts(tmp_path / "sub" / "p.csv", tmp_path / "imgs")
    assert item.image == tmp_path / "imgs" / "0.png" and item.prompt == "a cat"
    assert item.id.startswith("p-") and item.where.endswith("p.csv: line 2")


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"image": "imgs/9.png", "prompt": "a"}', r"line 2: field 'image': .*9.png.* does not "
         r"exist; fix the path"),
        ('{"image": "imgs/bad.png", "prompt": "a"}', r"line 2: field 'image': .*bad.png.* is not "
         r"a readable image.*replace it"),
        ('{"prompt": "a"}', r"line 2: field 'image': no image file; name it"),
        ('{"image": "imgs/0.png", "prompt": " "}', r"line 2: field 'prompt': no prompt"),
        ('{"image": "imgs/1.png", "prompt": "b", "id": "x"}', r"line 2: id 'x' is also used"),
    ],
)  # fmt: skip
def test_bad_image_prompt_lines_are_named(tmp_path, line, match):
    from fastwan.data.sources import load_image_prompts

    _images(tmp_path)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    (tmp_path / "p.jsonl").write_text('{"image": "imgs/0.png", "prompt": "a", "id": "x"}\n' + line)
    with pytest.raises(ValueError, match=match):
        load_image_prompts(tmp_path / "p.jsonl")


def test_text_prompt_files_are_refused_for_image_to_video(tmp_path):
    from fastwan.data.sources import load_image_prompts

    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match=r"need an image per prompt: write a \.jsonl"):
        load_image_prompts(tmp_path / "p.txt")


def test_preprocess_prompts_with_images_skips_images_that_break_later(tmp_path):
    """The core with stand-in encoders: rows per pair; an image deleted or truncated after
    the file was read is skipped and named, the rest written."""
    from PIL import Image

    from fastwan.data.preprocess import preprocess_prompts
    from fastwan.data.sources import load_image_prompts

    _images(tmp_path)
    Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(tmp_path / "imgs" / "t.jpg")
    names = ["0.png", "1.png", "2.png", "t.jpg"]
    (tmp_path / "p.csv").write_text(
        "image,prompt\n" + "".join(f"imgs/{n},prompt {i}\n" for i, n in enumerate(names))
    )
    items = load_image_prompts(tmp_path / "p.csv")
    (tmp_path / "imgs" / "1.png").unlink()
    data = (tmp_path / "imgs" / "t.jpg").read_bytes()
    (tmp_path / "imgs" / "t.jpg").write_bytes(data[: len(data) // 2])  # header fine, pixels not
    seen = []

    def encode_image(img):  # PIL RGB -> the condition at 8 x 12
        seen.append(img.size)
        pil = np.asarray(img.resize((12, 8)))
        return {"first_frame_latent": torch.full((4, 1, 2, 3), float(pil.mean())),
                "clip_feature": None, "pil_image": pil}  # fmt: skip

    def encode_text(prompts):
        return [torch.ones(len(p.split()), 8) for p in prompts]

    out = tmp_path / "out"
    s = preprocess_prompts(
        items, encode_text, out, encode_image=encode_image, height=8, width=12, num_frames=5,
        batch_size=3, progress=False,
    )  # fmt: skip
    assert s["rows_written"] == 2 and s["skipped_by_reason"] == {
        "missing_image": 1,
        "unreadable_image": 1,
    }
    details = " ".join(x["detail"] for x in s["skipped_items"])
    assert "line 3: field 'image'" in details and "line 5: field 'image'" in details
    assert seen == [(30, 20), (30, 28)]  # each good image as given (CLIP sees it unresized)
    ds = LatentDataset(out, text_length=4, text_only=True, image_condition=True)
    assert sorted(ds[i]["caption"] for i in range(2)) == ["prompt 0", "prompt 2"]
    assert ds[0]["pil_image"].shape == (8, 12, 3)
    with pytest.raises(ValueError, match=r"\['num_frames'\]"):
        preprocess_prompts(items, encode_text, tmp_path / "x", encode_image=encode_image,
                           height=8, width=12)  # fmt: skip
