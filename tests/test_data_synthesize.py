"""Synthetic datasets: the core with a stand-in teacher (ids, seeds, settings, ranks,
resuming) and ``fastwan synthesize`` with a tiny Diffusers-layout Wan teacher."""

from __future__ import annotations

import argparse
import json

import pyarrow.parquet as pq
import pytest
import torch
from _tiny_wan import build_tiny_wan

from fastwan.data.dataset import LatentDataset
from fastwan.data.parquet_io import list_parquet_files, read_ids
from fastwan.data.sources import PromptItem, load_prompts
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
