"""Synthetic datasets: the core with a stand-in teacher (ids, seeds, settings, ranks,
resuming) and ``fastwan synthesize`` with a tiny Diffusers-layout Wan teacher."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _tiny_wan import build_tiny_wan

from fastwan.data.dataset import LatentDataset
from fastwan.data.parquet_io import list_parquet_files, read_ids
from fastwan.data.sources import PromptItem, load_image_prompts, load_prompts
from fastwan.data.synthesize import sample_seed, synthesize

SETTINGS = dict(teacher="stand-in", steps=50, guidance_scale=5.0, height=16, width=24,
                num_frames=5, fps=16.0)  # fmt: skip
PROMPTS = [PromptItem(f"p{i}", f"prompt number {i}") for i in range(5)]


def fake_generate(prompt: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 2, 2, 3, generator=g) + len(prompt)  # [C, T, H, W]


def fake_text(prompts):
    return [torch.full((len(p.split()), 8), float(len(p))) for p in prompts]  # [L, 8]


def _rows(out):
    rows = []
    for f in list_parquet_files(out):
        rows += pq.read_table(f).to_pylist()
    return {r["id"]: r for r in rows}


def test_synthesize_rows_seeds_and_settings(tmp_path):
    summary = synthesize(
        PROMPTS, fake_generate, fake_text, tmp_path, settings=SETTINGS,
        samples_per_prompt=2, seed=11, rows_per_shard=4, progress=False,
    )  # fmt: skip
    assert summary["rows_written"] == 10 and summary["complete"]
    rows = _rows(tmp_path)
    assert set(rows) == {f"p{i}/s{k}" for i in range(5) for k in range(2)}
    seeds = set()
    ds = LatentDataset(tmp_path, text_length=4, normalize=False)
    samples = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    for row_id, row in rows.items():
        pid, k = row_id.split("/s")
        gen = json.loads(row["generation_settings"])
        assert gen == dict(SETTINGS, seed=sample_seed(11, pid, int(k)), sample=int(k))
        seeds.add(gen["seed"])
        prompt = f"prompt number {pid[1:]}"
        assert row["caption"] == prompt and row["media_type"] == "video"
        assert (row["width"], row["height"], row["num_frames"], row["fps"]) == (24, 16, 5, 16.0)
        # exact: the same seeded draw, stored as raw bytes and read back unnormalised
        assert torch.equal(samples[row_id]["latents"], fake_generate(prompt, gen["seed"]))
        assert torch.equal(samples[row_id]["text_embedding"][:3], fake_text([prompt])[0])
    assert len(seeds) == 10  # every sample has its own noise
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["kind"] == "video" and meta["settings"]["seed"] == 11
    with pytest.raises(ValueError, match="missing \\['fps'\\]"):
        synthesize(PROMPTS, fake_generate, fake_text, tmp_path / "x",
                   settings={k: v for k, v in SETTINGS.items() if k != "fps"})  # fmt: skip
    with pytest.raises(ValueError, match="steps: 50 before, 8 now"):
        synthesize(PROMPTS, fake_generate, fake_text, tmp_path,
                   settings=dict(SETTINGS, steps=8), samples_per_prompt=2, seed=11)  # fmt: skip


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "p-abc", 0) == sample_seed(0, "p-abc", 0)
    values = {sample_seed(s, p, k) for s in (0, 1) for p in ("a", "b") for k in range(3)}
    assert len(values) == 12 and all(0 <= v < 2**31 for v in values)


def test_ranks_take_disjoint_shares(tmp_path):
    for rank in range(3):
        s = synthesize(PROMPTS, fake_generate, fake_text, tmp_path, settings=SETTINGS,
                       samples_per_prompt=2, rank=rank, world_size=3, progress=False)  # fmt: skip
        assert s["rows_written"] == len(range(rank, 10, 3))
        assert (tmp_path / f"summary-rank{rank:03d}.json").is_file()
    assert len(read_ids(list_parquet_files(tmp_path))) == 10  # all, no duplicates


def test_interrupted_synthesis_resumes_without_duplicates(tmp_path):
    clean = tmp_path / "clean"
    synthesize(PROMPTS, fake_generate, fake_text, clean, settings=SETTINGS,
               samples_per_prompt=2, progress=False)  # fmt: skip
    calls = []

    def crashing(prompt, seed):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(seed)
        return fake_generate(prompt, seed)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        synthesize(PROMPTS, crashing, fake_text, out, settings=SETTINGS,
                   samples_per_prompt=2, rows_per_shard=3, progress=False)  # fmt: skip
    assert len(read_ids(list_parquet_files(out))) == 5  # the complete rows were kept
    counting = _counter()
    resumed = synthesize(PROMPTS, counting, fake_text, out, settings=SETTINGS,
                         samples_per_prompt=2, progress=False)  # fmt: skip
    assert resumed["rows_before"] == 5 and resumed["rows_written"] == 5
    assert counting.calls == 5  # only the samples not yet written
    a, b = _rows(out), _rows(clean)
    assert a.keys() == b.keys()
    assert all(a[k]["vae_latent_bytes"] == b[k]["vae_latent_bytes"] for k in a)


def _counter():
    def generate(prompt, seed):
        generate.calls += 1
        return fake_generate(prompt, seed)

    generate.calls = 0
    return generate


# ---------------------------------------------------------------- CLI, tiny Wan teacher


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("teacher"))


def _cli(argv):
    from fastwan.commands import synthesize as command

    parser = argparse.ArgumentParser(prog="fastwan")
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_synthesize_with_tiny_wan_teacher(tiny_wan, tmp_path, monkeypatch, capsys):
    from fastwan.data.encoders import vae_latent_stats
    from fastwan.pipeline import VideoGenerator

    (tmp_path / "prompts.txt").write_text("a red cat runs\na blue bird flies\n")
    out = tmp_path / "syn"

    def argv(out):
        return [
            "synthesize", "--teacher", str(tiny_wan), "--prompts", str(tmp_path / "prompts.txt"),
            "--out", str(out), "--steps", "2", "--guidance", "3.0", "--height", "32",
            "--width", "48", "--num-frames", "5", "--preset", "wan2.1-t2v-1.3b",
            "--samples-per-prompt", "2", "--seed", "7", "--max-sequence-length", "16",
            "--device", "cpu", "--no-progress",
        ]  # fmt: skip

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _cli(argv(out)) == 0
    assert "4 rows written" in capsys.readouterr().out
    mean, std = vae_latent_stats(tiny_wan)
    ds = LatentDataset(out, text_length=16, latents_mean=mean, latents_std=std)
    assert len(ds) == 4
    prompt = load_prompts(tmp_path / "prompts.txt")[1]
    i = [ds[k]["id"] for k in range(4)].index(f"{prompt.id}/s1")
    sample = ds[i]
    row = _rows(out)[sample["id"]]
    gen_settings = json.loads(row["generation_settings"])
    seed = sample_seed(7, prompt.id, 1)
    assert gen_settings["seed"] == seed and gen_settings["steps"] == 2
    assert gen_settings["guidance_scale"] == 3.0 and gen_settings["sampler"] == "scheduler"
    assert gen_settings["negative_prompt"].startswith("Bright tones")  # the preset's
    assert row["caption"] == prompt.prompt and row["fps"] == 16.0

    # the same teacher, seed and settings: the dataset's (normalised) latents are its output
    gen = VideoGenerator.from_pretrained(
        tiny_wan, preset="wan2.1-t2v-1.3b", attention="dense", device="cpu"
    )
    ref = gen.generate(
        prompt.prompt, height=32, width=48, num_frames=5, num_inference_steps=2,
        guidance_scale=3.0, seed=seed, output_type="latent", max_sequence_length=16,
        sampler="scheduler",
    )  # fmt: skip
    torch.testing.assert_close(sample["latents"], ref.latents[0], rtol=1e-4, atol=1e-4)
    cond = gen.encode_prompt([prompt.prompt], 16)[0]  # [16, 32], zero beyond the tokens
    torch.testing.assert_close(sample["text_embedding"], cond, rtol=1e-5, atol=1e-6)
    assert sample["text_mask"].sum() < 16

    # resuming the finished run generates nothing
    assert _cli(argv(out)) == 0
    assert "0 rows written (4 in" in capsys.readouterr().out
    # under torchrun each rank takes its share
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _cli(argv(tmp_path / "ranked")) == 0
    s = json.loads((tmp_path / "ranked" / "summary-rank001.json").read_text())
    assert s["rows_written"] == 2 and s["world_size"] == 2


# ------------------------------------------------------ image-to-video (image + prompt pairs)


def _pairs(root, n=2):
    from PIL import Image

    rng = np.random.default_rng(2)
    (root / "imgs").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24 + 8 * i, 40, 3), dtype=np.uint8)).save(
            root / "imgs" / f"{i}.png"
        )
        lines.append({"image": f"imgs/{i}.png", "prompt": ["a red cat runs", "a bird flies"][i]})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return root / "pairs.jsonl"


def test_synthesize_i2v_rows_hold_the_condition_the_teacher_sampled_with(tmp_path):
    """The core with stand-ins: the teacher gets each pair's image and CLIP features; the
    rows are i2v rows holding that condition; the condition is computed once per image;
    an image gone since the file was read is skipped and named."""
    items = load_image_prompts(_pairs(tmp_path))
    encoded, calls = [], []

    def encode_image(img):  # PIL -> condition at 16 x 24 (latent 2 x 3)
        encoded.append(img.size)
        value = float(np.asarray(img).mean())
        return {"first_frame_latent": torch.full((4, 1, 2, 3), value),
                "clip_feature": torch.full((5, 6), value),
                "pil_image": np.zeros((16, 24, 3), np.uint8)}  # fmt: skip

    def generate(prompt, seed, *, image, image_embeds):
        calls.append((image.size, image_embeds.shape))
        return fake_generate(prompt, seed)

    out = tmp_path / "out"
    s = synthesize(items, generate, fake_text, out, settings=SETTINGS, samples_per_prompt=2,
                   encode_image=encode_image, progress=False)  # fmt: skip
    assert s["rows_written"] == 4
    assert encoded == [(40, 24), (40, 32)]  # once per image, as given
    assert calls == [((40, 24), (5, 6))] * 2 + [((40, 32), (5, 6))] * 2
    ds = LatentDataset(out, text_length=4, normalize=False, image_condition=True)
    rows = _rows(out)
    for i in range(len(ds)):
        sample = ds[i]
        gen = json.loads(rows[sample["id"]]["generation_settings"])
        item = next(p for p in items if sample["id"].startswith(p.id))
        assert gen["image"] == item.image_name
        assert gen["seed"] == sample_seed(0, item.id, gen["sample"])
        assert torch.equal(sample["latents"], fake_generate(item.prompt, gen["seed"]))
        assert sample["first_frame_latent"].shape == (4, 1, 2, 3)
        assert sample["clip_feature"].shape == (5, 6)
    assert json.loads((out / "dataset.json").read_text())["kind"] == "i2v"

    (tmp_path / "imgs" / "1.png").unlink()
    s = synthesize(items, generate, fake_text, tmp_path / "gone", settings=SETTINGS,
                   samples_per_prompt=2, encode_image=encode_image, progress=False)  # fmt: skip
    assert s["rows_written"] == 2 and s["skipped_by_reason"] == {"missing_image": 1}
    assert "pairs.jsonl: line 2: field 'image'" in s["skipped_items"][0]["detail"]
    with pytest.raises(ValueError, match="has no image"):
        synthesize(PROMPTS, generate, fake_text, tmp_path / "x", settings=SETTINGS,
                   encode_image=encode_image)  # fmt: skip


@pytest.fixture(scope="module")
def i2v_teachers(tmp_path_factory):
    from _tiny_wan import build_tiny_wan_i2v

    root = tmp_path_factory.mktemp("i2v_teachers")
    return {
        "wan2.1": (build_tiny_wan_i2v(root / "wan21_i2v"), 32, 48),
        "wan2.2": (build_tiny_wan_i2v(root / "wan22_ti2v", variant="wan2.2"), 64, 96),
    }


@pytest.mark.parametrize("variant", ["wan2.1", "wan2.2"])
def test_cli_synthesize_i2v_with_tiny_teachers(
    i2v_teachers, variant, tmp_path, monkeypatch, capsys
):
    """Rows: the teacher's generate(image=...) latents for the pair's seed, and the image's
    condition as the data encoder computes it (Wan2.2 TI2V: the sample's first latent
    frame is that condition, kept clean)."""
    from fastwan.data.encoders import WanImageConditionEncoder, vae_latent_stats
    from fastwan.models.loading import load_vae
    from fastwan.pipeline import VideoGenerator

    model, height, width = i2v_teachers[variant]
    pairs = _pairs(tmp_path)
    out = tmp_path / "syn"
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    task = [] if variant == "wan2.1" else ["--task", "i2v"]  # I2V teachers default to i2v
    argv = [
        "synthesize", "--teacher", str(model), "--prompts", str(pairs), "--out", str(out),
        "--steps", "2", "--guidance", "3.0", "--height", str(height), "--width", str(width),
        "--num-frames", "5", "--max-sequence-length", "16", "--device", "cpu",
        "--no-progress", *task,
    ]  # fmt: skip
    assert _cli(argv) == 0
    assert "synthesize i2v: 2 rows written" in capsys.readouterr().out
    mean, std = vae_latent_stats(model)
    ds = LatentDataset(
        out, text_length=16, latents_mean=mean, latents_std=std, image_condition=True
    )
    item = load_image_prompts(pairs)[1]
    sample = next(ds[i] for i in range(2) if ds[i]["id"] == f"{item.id}/s0")
    image = tmp_path / "imgs" / "1.png"
    gen = VideoGenerator.from_pretrained(model, attention="dense", device="cpu")
    ref = gen.generate(
        item.prompt, image=image, height=height, width=width, num_frames=5,
        num_inference_steps=2, guidance_scale=3.0, seed=sample_seed(0, item.id, 0),
        output_type="latent", max_sequence_length=16, sampler="scheduler",
    )  # fmt: skip
    torch.testing.assert_close(sample["latents"], ref.latents[0], rtol=1e-4, atol=1e-4)
    encoder = WanImageConditionEncoder.from_pretrained(model, vae=load_vae(model / "vae"))
    cond = encoder.encode_image(image, height=height, width=width, num_frames=5)
    torch.testing.assert_close(sample["first_frame_latent"], cond["first_frame_latent"])
    assert torch.equal(sample["pil_image"], cond["pil_image"])
    if variant == "wan2.1":
        assert sample["first_frame_latent"].shape == sample["latents"].shape == (16, 2, 4, 6)
        torch.testing.assert_close(sample["clip_feature"], cond["clip_feature"])
    else:
        assert sample["latents"].shape == (48, 2, 4, 6) and "clip_feature" not in sample
        assert sample["first_frame_latent"].shape == (48, 1, 4, 6)
        first = sample["latents"][:, :1]  # the clean first frame: the given image's latent
        torch.testing.assert_close(first, sample["first_frame_latent"], rtol=1e-5, atol=1e-5)
    gen_settings = json.loads(_rows(out)[sample["id"]]["generation_settings"])
    assert gen_settings["image"] == "imgs/1.png" and gen_settings["task"] == "i2v"


def test_cli_synthesize_i2v_refuses_bad_input(i2v_teachers, tiny_wan, tmp_path):
    pairs = _pairs(tmp_path)
    i2v, _, _ = i2v_teachers["wan2.1"]

    def argv(teacher, *extra):
        return ["synthesize", "--teacher", str(teacher), "--prompts", str(pairs), "--out",
                str(tmp_path / "out"), "--device", "cpu", *extra]  # fmt: skip

    with pytest.raises(ValueError, match="--task i2v: .* is a text-to-video model"):
        _cli(argv(tiny_wan, "--task", "i2v"))
    with pytest.raises(ValueError, match="--task t2v: .* image-to-video model.*--task i2v"):
        _cli(argv(i2v, "--task", "t2v"))
    (tmp_path / "imgs" / "0.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"line 1: field 'image': .* not a readable image"):
        _cli(argv(i2v))
    assert not (tmp_path / "out").exists()
