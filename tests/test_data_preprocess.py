"""Preprocessing: decoding / resampling / cropping MP4s written by the test, the round trip
videos -> parquet -> decoded latents, skipped inputs, resuming, and the CLI commands on a
tiny Diffusers-layout Wan pipeline."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_wan import build_tiny_wan, build_tiny_wan_i2v

from fastwan.data.dataset import LatentDataset
from fastwan.data.parquet_io import EMPTY_PROMPT_FILE, list_parquet_files, read_ids
from fastwan.data.preprocess import check_clip_size, preprocess_prompts, preprocess_videos
from fastwan.data.schema import SchemaError
from fastwan.data.sources import load_captions, load_prompts
from fastwan.data.video_decode import VideoDecodeError, decode_clip, resize_center_crop
from fastwan.video_io import save_video

POOL = 4  # spatial stride of the test's linear autoencoder


def blob_frames(num: int, fps: float, height: int, width: int, scale: float = 1.0) -> np.ndarray:
    """A smooth Gaussian blob moving right at 40 px/s (in 64-px units), uint8 [T, H, W, 3].

    ``scale`` renders the same scene at a different resolution (coordinates scaled)."""
    t = np.arange(num)[:, None, None] / fps
    y = np.arange(height)[None, :, None] / scale
    x = np.arange(width)[None, None, :] / scale
    cx = 12 + 40 * t + (width / scale - 64) / 2  # the blob stays in the central 64 px
    cy = 0.5 * height / scale
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 9.0**2))  # [T, H, W]
    rgb = np.stack([blob, 0.6 * blob, 0.3 + 0.4 * blob], axis=-1)
    return np.round(255 * np.clip(rgb, 0, 1)).astype(np.uint8)


class PoolAutoencoder:
    """A linear stand-in for a VAE whose decode(encode(x)) is close to a smooth x:
    encode = average-pool POOL x POOL (frames kept), decode = bilinear upsampling."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        self.calls += 1
        x = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, T, H, W]
        return F.avg_pool3d(x[None], (1, POOL, POOL))[0]  # [3, T, H/POOL, W/POOL]

    @staticmethod
    def decode(latent: torch.Tensor) -> np.ndarray:
        c, t, h, w = latent.shape
        x = F.interpolate(latent.permute(1, 0, 2, 3), scale_factor=POOL, mode="bilinear")
        return ((x.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).numpy()  # [T, H, W, 3] in [0, 1]


def fake_text(prompts):
    """[L, 8] per prompt: L = words + 1, values from the characters."""
    out = []
    for p in prompts:
        codes = torch.tensor([ord(c) for c in (p + "#")[:8]], dtype=torch.float32)
        out.append(codes.repeat(len(p.split()) + 1, 1) / 100)  # [L, 8]
    return out


CLIP = dict(height=64, width=64, num_frames=9, fps=12.0)


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    videos = root / "videos"
    # wide 64x96 at 24 fps -> resampled to 12 fps (every 2nd frame) and centre-cropped
    save_video(blob_frames(24, 24, 64, 96), videos / "wide.mp4", fps=24, quality=10)
    # 128x128 at 12 fps -> resized by 1/2
    save_video(blob_frames(12, 12, 128, 128, scale=2), videos / "big.mp4", fps=12, quality=10)
    save_video(blob_frames(16, 12, 64, 64), videos / "sub" / "c.mp4", fps=12, quality=10)
    save_video(blob_frames(5, 12, 64, 64), videos / "short.mp4", fps=12, quality=10)
    (videos / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    save_video(blob_frames(16, 12, 64, 64), videos / "uncaptioned.mp4", fps=12)
    captions = [
        {"path": "wide.mp4", "cap": ["a blob moving right", ""]},  # second caption empty
        {"path": "big.mp4", "caption": "a big blob"},
        {"path": "corrupt.mp4", "caption": "broken file"},
        {"path": "short.mp4", "caption": "too short"},
        {"path": "missing.mp4", "caption": "not there"},
        {"path": "sub/c.mp4", "caption": "blob in a folder"},
    ]
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def expected_clip(name: str) -> np.ndarray:
    """What preprocessing should produce, rendered directly at the target grid [T, 64, 64, 3]."""
    frames = blob_frames(CLIP["num_frames"], CLIP["fps"], 64, 96 if name == "wide" else 64)
    return frames[:, :, 16:80] if name == "wide" else frames


# ------------------------------------------------------------------------- decoding


def test_decode_resamples_by_timestamp_and_crops(tmp_path):
    levels = (np.arange(30) * 8).astype(np.uint8)  # frame i is uniformly gray 8 i
    frames = np.repeat(levels[:, None, None, None], 3, axis=-1) * np.ones((30, 32, 48, 3), np.uint8)
    save_video(frames, tmp_path / "gray.mp4", fps=30, quality=10)
    for fps, step in ((30, 1), (15, 2), (10, 3)):
        clip = decode_clip(tmp_path / "gray.mp4", num_frames=9, fps=fps, height=32, width=32)
        got = clip.frames.reshape(9, -1).mean(1)
        np.testing.assert_allclose(got, 8 * step * np.arange(9), atol=3)
        assert clip.source_fps == 30 and (clip.source_width, clip.source_height) == (48, 32)
    # 60 fps from a 30 fps video repeats each frame twice (nearest frame, ties to the earlier)
    clip = decode_clip(tmp_path / "gray.mp4", num_frames=6, fps=60, height=32, width=32)
    np.testing.assert_allclose(clip.frames.reshape(6, -1).mean(1), [0, 0, 8, 8, 16, 16], atol=3)
    # decoding stops once the clip is complete
    assert (
        decode_clip(
            tmp_path / "gray.mp4", num_frames=3, fps=30, height=32, width=32
        ).source_frames_read
        <= 5
    )
    # 30 frames at 30 fps = 1 s: 16 frames at 15 fps (1.0 s + 1 frame) is too long
    with pytest.raises(VideoDecodeError, match="give only 15 of the 16 frames") as err:
        decode_clip(tmp_path / "gray.mp4", num_frames=16, fps=15, height=32, width=32)
    assert err.value.reason == "too_short"
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(VideoDecodeError, match="junk.mp4: cannot decode") as err:
        decode_clip(tmp_path / "junk.mp4", num_frames=1, fps=1, height=8, width=8)
    assert err.value.reason == "unreadable"


def test_resize_center_crop_keeps_the_centre():
    frame = np.zeros((1, 40, 80, 3), np.uint8)
    frame[:, :, :20] = (255, 0, 0)  # red left quarter
    frame[:, :, 20:60] = (0, 255, 0)  # green centre
    frame[:, :, 60:] = (0, 0, 255)
    out = resize_center_crop(frame, 20, 20)  # scale 1/2, keeps the central 40x40: green
    assert out.shape == (1, 20, 20, 3) and (out == (0, 255, 0)).all()
    out = resize_center_crop(frame, 40, 160)  # scale 2: covers width, cuts rows
    assert out.shape == (1, 40, 160, 3) and out[0, :, 0, 0].min() == 255
    # exact: at scale 1 the centre is cut out, not resampled (uint8 either way)
    assert resize_center_crop(frame, 40, 40).tolist() == frame[:, :, 20:60].tolist()


def test_check_clip_size_names_the_nearest_valid_values():
    check_clip_size(480, 832, 81, 16)
    with pytest.raises(
        ValueError, match="--height=470 is not a multiple of 16 .VAE x8 times patch 2.*464 or 480"
    ):
        check_clip_size(470, 832, 81, 16)
    with pytest.raises(ValueError, match="--num-frames=80 must be 1 \\+ a multiple of 4.*77 or 81"):
        check_clip_size(480, 832, 80, 16)
    with pytest.raises(ValueError, match="--fps"):
        check_clip_size(480, 832, 81, 0)


# ----------------------------------------------------------------------- round trip


def test_round_trip_videos_to_parquet_to_decoded_latents(video_set, tmp_path):
    items = load_captions(video_set / "captions.json", video_set / "videos")
    ae = PoolAutoencoder()
    out = tmp_path / "out"
    summary = preprocess_videos(items, ae, fake_text, out, rows_per_shard=2, progress=False, **CLIP)
    assert summary["complete"] and summary["rows_written"] == 3
    assert summary["skipped_by_reason"] == {
        "empty_caption": 1,
        "missing_file": 1,
        "too_short": 1,
        "unreadable": 1,
    }
    reasons = {s["item"]: s["reason"] for s in summary["skipped_items"]}
    assert reasons == {
        "wide.mp4#1": "empty_caption",
        "corrupt.mp4": "unreadable",
        "short.mp4": "too_short",
        "missing.mp4": "missing_file",
    }
    assert json.loads((out / "summary.json").read_text())["skipped"] == 4
    assert [p.name for p in list_parquet_files(out)] == [
        "shard-000-000000.parquet",
        "shard-000-000001.parquet",
    ]
    np.testing.assert_allclose(np.load(out / EMPTY_PROMPT_FILE), fake_text([""])[0])

    ds = LatentDataset(out, text_length=8, normalize=False)
    by_id = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    assert set(by_id) == {"wide.mp4#0", "big.mp4", "sub/c.mp4"}
    for row_id, name in (("wide.mp4#0", "wide"), ("big.mp4", "big"), ("sub/c.mp4", "c")):
        s = by_id[row_id]
        assert s["latents"].shape == (3, 9, 64 // POOL, 64 // POOL)
        decoded = PoolAutoencoder.decode(s["latents"])  # [T, 64, 64, 3]
        want = expected_clip(name) / 255.0
        err = np.abs(decoded - want).mean()
        assert err < 0.02, (row_id, err)
        # the test sees a wrong resampling / crop: frames at the source rate, or uncropped
        wrong = np.abs(decoded - blob_frames(9, 24, 64, 64) / 255.0).mean()
        assert wrong > 3 * err, (row_id, err, wrong)
        n = len(s["caption"].split()) + 1
        torch.testing.assert_close(s["text_embedding"][:n], fake_text([s["caption"]])[0])
    # rows carry the clip's metadata
    import pyarrow.parquet as pq

    table = pq.read_table(list_parquet_files(out)[0]).to_pylist()[0]
    assert (table["width"], table["height"], table["num_frames"], table["fps"]) == (64, 64, 9, 12)
    assert table["media_type"] == "video" and table["file_name"] == "wide.mp4"
    assert table["duration_sec"] == pytest.approx(9 / 12)


class Crash(RuntimeError):
    pass


def test_interrupted_preprocess_resumes_without_duplicates(video_set, tmp_path):
    items = load_captions(video_set / "captions.json", video_set / "videos")
    clean = tmp_path / "clean"
    preprocess_videos(
        items, PoolAutoencoder(), fake_text, clean, rows_per_shard=1, progress=False, **CLIP
    )

    class CrashOnThird(PoolAutoencoder):
        def __call__(self, frames):
            if self.calls == 2:
                raise Crash("simulated crash")
            return super().__call__(frames)

    out = tmp_path / "out"
    with pytest.raises(Crash):
        preprocess_videos(
            items, CrashOnThird(), fake_text, out, rows_per_shard=1, progress=False, **CLIP
        )
    first = json.loads((out / "summary.json").read_text())
    assert not first["complete"] and first["rows_written"] == 2
    (out / ".shard-000-000007.parquet.tmp").write_bytes(b"half a shard")  # a killed write
    ae = PoolAutoencoder()
    summary = preprocess_videos(items, ae, fake_text, out, rows_per_shard=1, progress=False, **CLIP)
    assert summary["complete"] and summary["rows_before"] == 2 and summary["rows_written"] == 1
    assert ae.calls == 1  # only the video that was not done
    assert not (out / ".shard-000-000007.parquet.tmp").exists()
    ids = read_ids(list_parquet_files(out))  # raises on duplicates
    assert set(ids) == set(read_ids(list_parquet_files(clean)))
    a = LatentDataset(out, text_length=8, normalize=False)
    b = LatentDataset(clean, text_length=8, normalize=False)
    got = {a[i]["id"]: a[i]["latents"] for i in range(len(a))}
    for i in range(len(b)):  # exact: each video is encoded alone, the same op on the same
        assert torch.equal(got[b[i]["id"]], b[i]["latents"])  # frames, in this process
    # a complete folder: nothing to encode; skipped inputs are retried and reported again
    again = preprocess_videos(items, ae, fake_text, out, rows_per_shard=1, progress=False, **CLIP)
    assert again["rows_written"] == 0 and again["skipped"] == 4 and ae.calls == 1
    with pytest.raises(ValueError, match="num_frames: 9 before, 13 now"):
        preprocess_videos(items, ae, fake_text, out, **dict(CLIP, num_frames=13))


def test_ranks_split_the_videos(video_set, tmp_path):
    items = load_captions(video_set / "captions.json", video_set / "videos")
    for rank in (0, 1):
        preprocess_videos(
            items,
            PoolAutoencoder(),
            fake_text,
            tmp_path,
            rank=rank,
            world_size=2,
            progress=False,
            **CLIP,
        )
    s0 = json.loads((tmp_path / "summary-rank000.json").read_text())
    s1 = json.loads((tmp_path / "summary-rank001.json").read_text())
    assert s0["inputs"] + s1["inputs"] == len(items)
    assert s0["rows_written"] + s1["rows_written"] == 3
    assert len(read_ids(list_parquet_files(tmp_path))) == 3


def test_preprocess_prompts_text_only(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na dog runs\na bird\n")
    prompts = load_prompts(tmp_path / "p.txt")
    out = tmp_path / "out"
    s = preprocess_prompts(prompts, fake_text, out, rows_per_shard=2, batch_size=2, progress=False)
    assert s["rows_written"] == 3 and len(list_parquet_files(out)) == 2
    ds = LatentDataset(out, text_length=8, text_only=True)
    assert sorted(ds[i]["caption"] for i in range(3)) == ["a bird", "a cat", "a dog runs"]
    assert preprocess_prompts(prompts, fake_text, out, progress=False)["rows_written"] == 0
    with pytest.raises(SchemaError, match="missing column 'vae_latent_bytes'"):
        LatentDataset(out, text_length=8, normalize=False)


# -------------------------------------------------------------------- CLI, tiny Wan


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan"))


def _cli(argv):
    from fastwan.commands import preprocess as command

    parser = argparse.ArgumentParser(prog="fastwan")
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_preprocess_with_tiny_wan(video_set, tiny_wan, tmp_path, capsys):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from fastwan.data.encoders import vae_latent_stats

    out = tmp_path / "out"

    def argv(out=out, num_frames=9):
        return [
            "preprocess", "--videos", str(video_set / "videos"), "--captions",
            str(video_set / "captions.json"), "--model", str(tiny_wan), "--out", str(out),
            "--height", "64", "--width", "64", "--num-frames", str(num_frames), "--fps", "12",
            "--max-sequence-length", "16", "--no-progress", "--device", "cpu",
        ]  # fmt: skip

    with pytest.warns(UserWarning, match="truncated"):  # unknown words: spelt letter by letter
        assert _cli(argv()) == 0
    printed = capsys.readouterr().out
    assert "3 rows written" in printed and "4 skipped" in printed
    assert "1 videos in" in printed  # uncaptioned.mp4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos_without_caption_list"] == ["uncaptioned.mp4"]

    mean, std = vae_latent_stats(tiny_wan)
    ds = LatentDataset(out, text_length=16, latents_mean=mean, latents_std=std)
    raw = LatentDataset(out, text_length=16, normalize=False)
    vae = AutoencoderKLWan.from_pretrained(str(tiny_wan / "vae")).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_wan / "tokenizer"))
    enc = UMT5EncoderModel.from_pretrained(str(tiny_wan / "text_encoder")).eval()
    i = [raw[k]["id"] for k in range(len(raw))].index("big.mp4")
    s, r = ds[i], raw[i]
    assert r["latents"].shape == (16, 3, 8, 8)
    # the stored latent is the VAE posterior mean of the decoded, resized clip
    clip = decode_clip(video_set / "videos" / "big.mp4", **CLIP).frames
    x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, 9, 64, 64]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean[0]  # [16, 3, 8, 8]
        video = vae.decode(r["latents"][None]).sample[0]  # [3, 9, 64, 64]
        video_ref = vae.decode(z[None]).sample[0]
    torch.testing.assert_close(r["latents"], z, rtol=1e-4, atol=1e-5)
    assert video.shape == (3, 9, 64, 64)
    torch.testing.assert_close(video, video_ref, rtol=1e-4, atol=1e-4)
    m = torch.tensor(mean).view(-1, 1, 1, 1)
    torch.testing.assert_close(
        s["latents"], (z - m) / torch.tensor(std).view(-1, 1, 1, 1), rtol=1e-4, atol=1e-4
    )
    # the text embedding: UMT5 on the caption's valid tokens
    ids = tok(["a big blob"], return_tensors="pt")
    with torch.no_grad():
        h = enc(ids.input_ids, ids.attention_mask).last_hidden_state[0]  # [L, 32]
    n = int(r["text_mask"].sum())
    assert n == h.shape[0]
    torch.testing.assert_close(r["text_embedding"][:n], h, rtol=1e-4, atol=1e-5)
    assert np.load(out / EMPTY_PROMPT_FILE).shape == (1, 32)  # "" -> [</s>]

    # resumed with the same command: nothing new
    assert _cli(argv()) == 0
    assert "0 rows written (3 in" in capsys.readouterr().out
    # bad sizes are refused before any work
    with pytest.raises(ValueError, match="--num-frames=10 must be 1 \\+ a multiple of 4"):
        _cli(argv(out=tmp_path / "x", num_frames=10))
    assert not (tmp_path / "x").exists()


def test_cli_preprocess_text_with_tiny_wan(tiny_wan, tmp_path):
    long = " ".join(["a red cat"] * 8)  # 24 words: beyond 16 tokens
    lines = [{"id": "one", "prompt": "a red cat"}, "a dog runs", {"id": "long", "text": long}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "text"
    argv = [
        "preprocess-text",
        "--prompts",
        str(tmp_path / "p.jsonl"),
        "--model",
        str(tiny_wan),
        "--out",
        str(out),
        "--max-sequence-length",
        "16",
        "--no-progress",
        "--device",
        "cpu",
    ]
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 16 tokens were truncated"):
        assert _cli(argv) == 0
    ds = LatentDataset(out, text_length=16, text_only=True)
    rows = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    assert set(rows) == {"one", "long", load_prompts(tmp_path / "p.jsonl")[1].id}
    assert rows["one"]["caption"] == "a red cat" and 1 < rows["one"]["text_mask"].sum() < 16
    assert rows["long"]["text_mask"].all() and rows["long"]["caption"] == long


def test_cli_preprocess_i2v_writes_fastvideos_i2v_rows(video_set, tmp_path):
    """--task i2v: the first frame's condition latent (the VAE mean of [frame, 0, ...],
    normalised), its CLIP penultimate hidden states and the frame itself, per row."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = build_tiny_wan_i2v(tmp_path / "i2v")
    out = tmp_path / "out"
    argv = [
        "preprocess", "--videos", str(video_set / "videos"), "--captions",
        str(video_set / "captions.json"), "--model", str(model), "--out", str(out),
        "--height", "64", "--width", "64", "--num-frames", "9", "--fps", "12",
        "--max-sequence-length", "16", "--no-progress", "--device", "cpu", "--task", "i2v",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="truncated"):
        assert _cli(argv) == 0
    ds = LatentDataset(out, text_length=16, normalize=False, image_condition=True)
    i = [ds[k]["id"] for k in range(len(ds))].index("big.mp4")
    s = ds[i]
    frame = decode_clip(video_set / "videos" / "big.mp4", **CLIP).frames[0]  # [64, 64, 3]
    assert (s["pil_image"].numpy() == frame).all()
    vae = AutoencoderKLWan.from_pretrained(str(model / "vae")).eval()
    x = torch.from_numpy(frame).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    video = torch.cat([x, torch.zeros(1, 3, 8, 64, 64)], dim=2)  # [1, 3, 9, 64, 64]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want = (vae.encode(video).latent_dist.mode() - mean) / std
        enc = CLIPVisionModel.from_pretrained(str(model / "image_encoder")).eval()
        proc = CLIPImageProcessor.from_pretrained(str(model / "image_processor"))
        pixels = proc(images=[frame], return_tensors="pt")["pixel_values"]
        clip = enc(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(s["first_frame_latent"], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s["clip_feature"], clip, rtol=1e-4, atol=1e-5)
    assert s["latents"].shape == s["first_frame_latent"].shape == (16, 3, 8, 8)
    assert json.loads((out / "dataset.json").read_text())["kind"] == "i2v"


# ------------------------------------------- data-free image-to-video (image + prompt pairs)


@pytest.fixture(scope="module")
def i2v_models(tmp_path_factory):
    """The two kinds of image-to-video folder, with a size each takes: Wan2.1 I2V (CLIP,
    VAE stride 8) at 32 x 48 and Wan2.2 TI2V (VAE stride 16) at 64 x 96."""
    root = tmp_path_factory.mktemp("i2v_models")
    return {
        "wan2.1": (build_tiny_wan_i2v(root / "wan21_i2v"), 32, 48),
        "wan2.2": (build_tiny_wan_i2v(root / "wan22_ti2v", variant="wan2.2"), 64, 96),
    }


def _pairs(root):
    from PIL import Image

    rng = np.random.default_rng(5)
    (root / "imgs").mkdir()
    pairs = []
    for i, prompt in enumerate(["a red cat runs", "a blue bird flies"]):
        # another aspect than the clips': resized (not cropped) as VideoProcessor does
        Image.fromarray(rng.integers(0, 256, (30 + 10 * i, 70, 3), dtype=np.uint8)).save(
            root / "imgs" / f"{i}.png"
        )
        pairs.append({"image": f"{i}.png", "prompt": prompt})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    return root / "pairs.jsonl"


@pytest.mark.parametrize("variant", ["wan2.1", "wan2.2"])
def test_cli_preprocess_text_i2v_writes_the_pipelines_condition(
    i2v_models, variant, tmp_path, capsys
):
    """Each row: the prompt's embedding and its image's condition, equal to what
    VideoGenerator.generate(image=...) computes (so data-free training sees inference's
    condition): Wan2.2 TI2V the image's latent [48, 1, h, w], Wan2.1 I2V the latent of
    [image, 0, ...] [16, T, h, w] and CLIP features."""
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    from fastwan.data.encoders import WanImageConditionEncoder
    from fastwan.models.loading import load_vae
    from fastwan.pipeline import VideoGenerator

    model, height, width = i2v_models[variant]
    pairs = _pairs(tmp_path)
    out = tmp_path / "out"

    def argv(*extra):
        return [
            "preprocess-text", "--task", "i2v", "--prompts", str(pairs), "--images",
            str(tmp_path / "imgs"), "--model", str(model), "--out", str(out), "--height",
            str(height), "--width", str(width), "--num-frames", "5",
            "--max-sequence-length", "16", "--no-progress", "--device", "cpu", *extra,
        ]  # fmt: skip

    assert _cli(argv()) == 0
    printed = capsys.readouterr().out
    assert "2 rows written" in printed and ("i2v (CLIP + VAE)" if variant == "wan2.1" else
                                            "ti2v (VAE)") in printed  # fmt: skip
    ds = LatentDataset(out, text_length=16, text_only=True, image_condition=True)
    assert len(ds) == 2
    sample = next(ds[i] for i in range(2) if ds[i]["caption"] == "a blue bird flies")
    image = tmp_path / "imgs" / "1.png"
    h, w = height // (8 if variant == "wan2.1" else 16), width // (8 if variant == "wan2.1" else 16)
    want_shape = (16, 2, h, w) if variant == "wan2.1" else (48, 1, h, w)
    assert sample["first_frame_latent"].shape == want_shape
    # the image resized as diffusers' VideoProcessor does
    resized = VideoProcessor().preprocess(Image.open(image).convert("RGB"), height, width)
    pil = ((resized[0] + 1) * 127.5).round().permute(1, 2, 0).to(torch.uint8)
    assert torch.equal(sample["pil_image"], pil)
    # the data encoder and the pipeline compute the same condition
    encoder = WanImageConditionEncoder.from_pretrained(model, vae=load_vae(model / "vae"))
    ref = encoder.encode_image(image, height=height, width=width, num_frames=5)
    torch.testing.assert_close(sample["first_frame_latent"], ref["first_frame_latent"])
    gen = VideoGenerator.from_pretrained(model, attention="dense", device="cpu")
    cond = gen.prepare_image_condition(image, batch=1, height=height, width=width, num_frames=5)
    latent = cond.latent[0] if variant == "wan2.2" else cond.latent[0, 4:]  # past the mask
    torch.testing.assert_close(sample["first_frame_latent"], latent, rtol=1e-5, atol=1e-5)
    if variant == "wan2.1":
        torch.testing.assert_close(sample["clip_feature"], cond.image_embeds[0], rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    else:
        assert "clip_feature" not in sample
    text = gen.encode_prompt(["a blue bird flies"], 16)[0]  # [16, 32]
    torch.testing.assert_close(sample["text_embedding"], text, rtol=1e-5, atol=1e-6)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["kind"] == "i2v_text" and meta["settings"]["height"] == height

    assert _cli(argv()) == 0  # resumed: nothing new
    assert "0 rows written (2 in" in capsys.readouterr().out


def test_cli_preprocess_text_i2v_refuses_bad_input_before_work(i2v_models, tmp_path):
    model, _, _ = i2v_models["wan2.2"]
    pairs = _pairs(tmp_path)
    (tmp_path / "imgs" / "1.png").unlink()
    base = ["preprocess-text", "--prompts", str(pairs), "--model", str(model), "--out",
            str(tmp_path / "out"), "--device", "cpu", "--no-progress"]  # fmt: skip
    with pytest.raises(ValueError, match=r"pairs.jsonl: line 2: field 'image': .*1.png.* does "
                       r"not exist; fix the path.*--images"):  # fmt: skip
        _cli([*base, "--task", "i2v", "--images", str(tmp_path / "imgs")])
    (tmp_path / "imgs" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"line 2: field 'image': .* not a readable image"):
        _cli([*base, "--task", "i2v", "--images", str(tmp_path / "imgs")])
    (tmp_path / "imgs" / "1.png").unlink()
    (tmp_path / "pairs.jsonl").write_text('{"image": "0.png", "prompt": "a cat"}')
    with pytest.raises(ValueError, match="height=40 is not a multiple of 32"):
        _cli([*base, "--task", "i2v", "--images", str(tmp_path / "imgs"), "--height", "40"])
    with pytest.raises(ValueError, match="--height needs --task i2v"):
        _cli([*base, "--height", "64"])
    assert not (tmp_path / "out").exists()


def test_cli_preprocess_i2v_with_a_ti2v_folder(video_set, i2v_models, tmp_path):
    """preprocess --task i2v with Wan2.2 TI2V: the condition is the first frame's latent
    alone, which is the causal VAE's first latent frame of the clip."""
    model, _, _ = i2v_models["wan2.2"]
    from fastwan.data.encoders import vae_latent_stats

    out = tmp_path / "out"
    argv = [
        "preprocess", "--videos", str(video_set / "videos"), "--captions",
        str(video_set / "captions.json"), "--model", str(model), "--out", str(out),
        "--height", "64", "--width", "64", "--num-frames", "9", "--fps", "12",
        "--max-sequence-length", "16", "--no-progress", "--device", "cpu", "--task", "i2v",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="truncated"):
        assert _cli(argv) == 0
    mean, std = vae_latent_stats(model)
    ds = LatentDataset(out, text_length=16, latents_mean=mean, latents_std=std,
                       image_condition=True)  # fmt: skip
    s = ds[0]
    assert s["latents"].shape == (48, 3, 4, 4) and s["first_frame_latent"].shape == (48, 1, 4, 4)
    torch.testing.assert_close(s["first_frame_latent"], s["latents"][:, :1], rtol=1e-4, atol=1e-4)
    assert "clip_feature" not in s
