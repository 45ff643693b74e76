"""The parquet schema (FastVideo-compatible), tensor (de)coding, atomic shard writing and
the caption / prompt file readers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _fastvideo_schema import FASTVIDEO_T2V, FASTVIDEO_TEXT_ONLY

from fastwan.data.parquet_io import ResumableOutput, ShardWriter, list_parquet_files, read_ids
from fastwan.data.schema import (
    SchemaError,
    arrow_schema,
    decode_tensor,
    encode_tensor,
    text_row,
    validate_schema,
    video_row,
)
from fastwan.data.sources import load_captions, load_prompts


def _row(i: int = 0, c: int = 4, t: int = 2) -> dict:
    g = torch.Generator().manual_seed(i)
    return video_row(
        id=f"clip{i}",
        latent=torch.randn(c, t, 2, 4, generator=g),
        text_embedding=torch.randn(3 + i % 2, 8, generator=g),
        caption=f"caption {i}",
        file_name=f"clip{i}.mp4",
        width=32,
        height=16,
        num_frames=4 * (t - 1) + 1,
        fps=16,
    )


def test_written_schema_is_fastvideos():
    assert [(f.name, f.type) for f in arrow_schema("video")] == FASTVIDEO_T2V
    text = [(f.name, f.type) for f in arrow_schema("text")]
    assert text == FASTVIDEO_TEXT_ONLY + [("media_type", pa.string())]
    # FastVideo's own text-only schema (no media_type) validates as text.
    assert validate_schema(pa.schema(FASTVIDEO_TEXT_ONLY), "f.parquet") == "text"
    assert validate_schema(pa.schema(FASTVIDEO_T2V), "f.parquet") == "video"
    # a video shard serves a text-only reader
    assert validate_schema(pa.schema(FASTVIDEO_T2V), "f.parquet", "text") == "text"
    # pandas-style large types are accepted
    large = [
        (n, pa.large_string() if t == pa.string() else pa.large_binary() if t == pa.binary() else t)
        for n, t in FASTVIDEO_T2V
    ]
    assert validate_schema(pa.schema(large), "f.parquet", "video") == "video"


def test_validate_schema_names_file_and_column():
    missing = pa.schema([f for f in FASTVIDEO_T2V if f[0] != "text_embedding_shape"])
    with pytest.raises(SchemaError, match=r"shard\.parquet: missing column 'text_embedding_shape'"):
        validate_schema(missing, "shard.parquet", "video")
    wrong = pa.schema(
        [(n, pa.string()) if n == "vae_latent_shape" else (n, t) for n, t in FASTVIDEO_T2V]
    )
    with pytest.raises(SchemaError, match=r"x\.parquet: column 'vae_latent_shape' has type string"):
        validate_schema(wrong, "x.parquet")
    wrong_meta = pa.schema([(n, pa.string()) if n == "width" else (n, t) for n, t in FASTVIDEO_T2V])
    with pytest.raises(SchemaError, match="column 'width' has type string, expected a integer"):
        validate_schema(wrong_meta, "x.parquet")
    with pytest.raises(SchemaError, match="missing column 'vae_latent_bytes'.*text_only: true"):
        validate_schema(pa.schema(FASTVIDEO_TEXT_ONLY), "t.parquet", "video")
    with pytest.raises(SchemaError, match="y.parquet: has neither vae_latent_bytes"):
        validate_schema(pa.schema([("id", pa.string())]), "y.parquet")


def test_tensor_round_trip_and_dtypes():
    x = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(0))
    cols = encode_tensor("vae_latent", x)
    assert cols["vae_latent_shape"] == [3, 2, 4, 5] and cols["vae_latent_dtype"] == "float32"
    # exact: the bytes round trip is lossless, and bf16 / fp16 -> float32 is exact
    assert torch.equal(decode_tensor(cols, "vae_latent", "w", ndim=4), x)
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        y = x.to(dtype)
        raw = y.view(torch.int16).numpy().astype("<i2").tobytes()
        row = {"t_bytes": raw, "t_shape": list(y.shape), "t_dtype": name}
        assert torch.equal(decode_tensor(row, "t", "w"), y.float())
    # corruption: truncated bytes, wrong ndim, NaN, unknown dtype, null
    bad = dict(cols, vae_latent_bytes=cols["vae_latent_bytes"][:-4])
    with pytest.raises(SchemaError, match=r"f\.parquet row 3: .*holds 476 bytes but shape"):
        decode_tensor(bad, "vae_latent", "f.parquet row 3")
    with pytest.raises(SchemaError, match="expected 2 dimensions"):
        decode_tensor(cols, "vae_latent", "w", ndim=2)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    nan_row = dict(cols, vae_latent_bytes=nan.numpy().tobytes())
    with pytest.raises(SchemaError, match="NaN or inf"):
        decode_tensor(nan_row, "vae_latent", "w")
    with pytest.raises(SchemaError, match="'vae_latent_dtype' is 'int8'"):
        decode_tensor(dict(cols, vae_latent_dtype="int8"), "vae_latent", "w")
    with pytest.raises(SchemaError, match="'vae_latent_bytes' is null"):
        decode_tensor(dict(cols, vae_latent_bytes=None), "vae_latent", "w")
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_tensor("vae_latent", nan)


def test_shard_writer_is_atomic_and_continues_numbering(tmp_path):
    schema = arrow_schema("video")
    w = ShardWriter(tmp_path, schema, rows_per_shard=3)
    written = [w.add(_row(i)) for i in range(7)]
    assert [p.name for p in written if p] == [
        "shard-000-000000.parquet",
        "shard-000-000001.parquet",
    ]
    assert w.pending == 1 and w.rows_written == 6
    w.flush()
    files = list_parquet_files(tmp_path)
    assert [pq.read_metadata(f).num_rows for f in files] == [3, 3, 1]
    assert set(read_ids(files)) == {f"clip{i}" for i in range(7)}
    # one row group per row: map-style reads decode one row
    assert pq.read_metadata(files[0]).num_row_groups == 3
    # a crash mid-write leaves a hidden temporary file: never read, removed by the next writer
    stale = tmp_path / ".shard-000-000003.parquet.tmp"
    stale.write_bytes(b"partial")
    assert list_parquet_files(tmp_path) == files
    w2 = ShardWriter(tmp_path, schema, rows_per_shard=3)
    assert not stale.exists()
    w2.add(_row(9))
    assert w2.flush().name == "shard-000-000003.parquet"
    # other ranks number their own shards
    assert ShardWriter(tmp_path, schema, 3, rank=2).flush() is None
    w3 = ShardWriter(tmp_path, schema, 1, rank=2)
    assert w3.add(_row(10)).name == "shard-002-000000.parquet"
    # a bad row is refused before it is buffered
    bad = _row(11)
    bad["vae_latent_shape"] = [1, 2, 3, 4]
    with pytest.raises(SchemaError, match="row 'clip11'.*bytes but shape"):
        w3.add(bad)
    assert w3.pending == 0
    with pytest.raises(SchemaError, match="missing"):
        w3.add({"id": "x"})


def test_read_ids_rejects_duplicates_and_corrupt_shards(tmp_path):
    schema = arrow_schema("video")
    ShardWriter(tmp_path, schema, 1, rank=0).add(_row(0))
    ShardWriter(tmp_path, schema, 1, rank=1).add(_row(0))
    with pytest.raises(SchemaError, match="id 'clip0' is also in"):
        read_ids(list_parquet_files(tmp_path))
    (tmp_path / "shard-001-000000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match="shard-001-000000.parquet: cannot read its 'id'"):
        read_ids(list_parquet_files(tmp_path))


def test_resumable_output_refuses_other_settings(tmp_path):
    out = ResumableOutput(tmp_path, "video", {"height": 16, "fps": 16.0}, rows_per_shard=2)
    out.add(_row(0))
    with pytest.raises(ValueError, match="already written"):
        out.add(_row(0))
    summary = out.finish(total_items=1)
    assert summary["rows_written"] == 1 and summary["complete"]
    assert json.loads((tmp_path / "summary.json").read_text())["rows_total"] == 1
    again = ResumableOutput(tmp_path, "video", {"height": 16, "fps": 16.0}, rows_per_shard=2)
    assert again.is_done("clip0") and again.rows_before == 1
    with pytest.raises(ValueError, match=r"height: 16 before, 32 now.*new --out"):
        ResumableOutput(tmp_path, "video", {"height": 32, "fps": 16.0}, rows_per_shard=2)
    with pytest.raises(ValueError, match="holds 'video' shards"):
        ResumableOutput(tmp_path, "text", {}, rows_per_shard=2)


def test_text_row_schema(tmp_path):
    row = text_row(id="p-1", text_embedding=torch.ones(5, 8), caption="a cat")
    assert row["media_type"] == "text" and row["text_embedding_shape"] == [5, 8]
    w = ShardWriter(tmp_path, arrow_schema("text"), 1)
    path = w.add(row)
    assert validate_schema(pq.read_schema(path), str(path)) == "text"
    with pytest.raises(ValueError, match=r"text_embedding must be \[L, dim\]"):
        text_row(id="p", text_embedding=torch.ones(5), caption="x")


# ----------------------------------------------------------------------- input files


def test_load_captions_formats(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (tmp_path / "caps.json").write_text(
        json.dumps(
            [
                {"path": "a.mp4", "cap": ["a red ball", "a ball"]},  # FastVideo's layout
                {"file_name": "sub/b.mp4", "caption": "a dog"},
                {"video": "a.mp4", "text": "third caption of a"},
            ]
        )
    )
    items = load_captions(tmp_path / "caps.json", videos)
    assert [i.file_name for i in items] == ["a.mp4", "sub/b.mp4"]
    assert items[0].captions == ["a red ball", "a ball", "third caption of a"]
    assert items[0].ids == ["a.mp4#0", "a.mp4#1", "a.mp4#2"]
    assert items[1].ids == ["sub/b.mp4"] and items[1].path == videos / "sub" / "b.mp4"

    (tmp_path / "caps.jsonl").write_text('{"path": "x.mp4", "caption": "one"}\n\n')
    assert load_captions(tmp_path / "caps.jsonl", videos)[0].captions == ["one"]
    (tmp_path / "caps.csv").write_text("Path,Caption\nx.mp4,one\ny.mp4,two\n")
    assert [i.captions for i in load_captions(tmp_path / "caps.csv", videos)] == [["one"], ["two"]]
    (tmp_path / "map.json").write_text(json.dumps({"x.mp4": "one"}))
    assert load_captions(tmp_path / "map.json", videos)[0].ids == ["x.mp4"]

    (tmp_path / "bad.jsonl").write_text('{"path": "x.mp4", "caption": "ok"}\n{"caption": "c"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: no video file; .*'path'"):
        load_captions(tmp_path / "bad.jsonl", videos)
    (tmp_path / "esc.json").write_text(json.dumps([{"path": "../x.mp4", "caption": "c"}]))
    with pytest.raises(ValueError, match="entry 0: video path '../x.mp4' must be relative"):
        load_captions(tmp_path / "esc.json", videos)
    (tmp_path / "caps.txt").write_text("x")
    with pytest.raises(ValueError, match=r"must end in \.json, \.jsonl or \.csv"):
        load_captions(tmp_path / "caps.txt", videos)
    with pytest.raises(ValueError, match="--videos folder"):
        load_captions(tmp_path / "caps.json", tmp_path / "nope")


def test_load_prompts_stable_ids(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\na cat\n")
    items = load_prompts(tmp_path / "p.txt")
    assert [i.prompt for i in items] == ["a cat", "a dog", "a cat"]
    assert items[0].id.startswith("p-") and items[2].id == items[0].id + "~2"
    # ids depend on the text, not the position: reordering keeps them
    (tmp_path / "q.txt").write_text("a dog\na cat\n")
    assert {i.id for i in load_prompts(tmp_path / "q.txt")} == {items[0].id, items[1].id}
    (tmp_path / "p.jsonl").write_text('"a cat"\n{"prompt": "a dog", "id": "d1"}\n')
    assert [(i.id, i.prompt) for i in load_prompts(tmp_path / "p.jsonl")][1] == ("d1", "a dog")
    (tmp_path / "p.json").write_text(
        json.dumps([{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])
    )
    with pytest.raises(ValueError, match="id 'x' is also used"):
        load_prompts(tmp_path / "p.json")
    (tmp_path / "e.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(tmp_path / "e.txt")
    np.testing.assert_equal(len(load_prompts(tmp_path / "p.jsonl")), 2)
