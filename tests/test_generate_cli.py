"""``fastwan generate`` end to end on a tiny FastWan-layout checkpoint."""

from __future__ import annotations

import pytest
from _tiny_wan import build_tiny_wan

import fastwan.cli as cli
from fastwan.video_io import read_video


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("fastwan"), gates="fastvideo")


@pytest.fixture()
def main(monkeypatch):
    # Only this command's module: the test does not depend on the other subcommands.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["fastwan.commands.generate"])
    return cli.main


BASE = ["--preset", "fastwan2.1-t2v-1.3b", "--max-sequence-length", "16", "--device", "cpu"]


def test_generate_writes_a_playable_mp4_of_the_requested_size(main, model_dir, tmp_path, capsys):
    out = tmp_path / "videos" / "cat.mp4"
    rc = main(
        [
            "generate",
            "--model",
            str(model_dir),
            *BASE,
            "--prompt",
            "a red cat runs",
            "--output",
            str(out),
            "--height",
            "32",
            "--width",
            "48",
            "--num-frames",
            "9",
            "--seed",
            "3",
            "--fps",
            "8",
        ]
    )
    assert rc == 0
    frames, fps = read_video(out)  # decodes every frame with ffmpeg
    assert frames.shape == (9, 32, 48, 3) and fps == 8
    assert frames.std() > 0
    captured = capsys.readouterr()
    assert "attention: vsa (sparsity 0.8)" in captured.out
    assert "dmd at t=[1000, 757, 522]" in captured.out
    assert "text_encode" in captured.out and "cat.mp4" in captured.out
    assert "3/3" in captured.err  # the progress bar reached the last step


def test_generate_batches_prompts_from_a_file(main, model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog sits\n# a comment\n\na blue fish swims\n")
    rc = main(
        [
            "generate",
            "--model",
            str(model_dir),
            *BASE,
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "clip.gif"),
            "--height",
            "32",
            "--width",
            "32",
            "--num-frames",
            "5",
            "--attention",
            "dense",
            "--timesteps",
            "1000,500",
            "--no-progress",
            "--compile",
            "aot_eager",
            "--vae-tiling",
        ]
    )
    assert rc == 0
    for i in range(2):
        frames, _ = read_video(tmp_path / f"clip_{i:03d}.gif")
        assert frames.shape[1:] == (32, 32, 3) and 1 <= frames.shape[0] <= 5
    out = capsys.readouterr().out
    assert "attention: dense; compiled (aot_eager); VAE tiling" in out
    assert "dmd at t=[1000, 500]" in out
    assert "all" in out  # the summed timing row


def test_generate_reports_bad_input_as_errors(main, model_dir, tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "a cat"])
    assert rc == 2
    assert "does not exist; pass a local Diffusers-format Wan folder" in capsys.readouterr().err
    rc = main(
        [
            "generate",
            "--model",
            str(model_dir),
            *BASE,
            "--prompt",
            "a cat",
            "--height",
            "40",
            "--width",
            "48",
            "--num-frames",
            "5",
            "--output",
            str(tmp_path / "x.mp4"),
        ]
    )
    assert rc == 2
    assert "nearest valid height: 32 or 48" in capsys.readouterr().err
    rc = main(["generate", "--model", str(model_dir), "--prompt", "a cat", "--output", "x.webm"])
    assert rc == 2
    assert "--output must end in .mp4 or .gif" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    rc = main(["generate", "--model", str(model_dir), "--prompts", str(empty)])
    assert rc == 2
    assert "holds no prompt" in capsys.readouterr().err
