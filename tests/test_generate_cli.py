"""``fastwan generate`` end to end on a tiny FastWan-layout checkpoint."""

from __future__ import annotations

import re

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


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if any weight loads: these errors must come first."""

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr("fastwan.pipeline.load_components", refuse)


def _gen(main, model_dir, *extra):
    return main(["generate", "--model", str(model_dir), *BASE, "--prompt", "a cat", *extra])


def test_unusable_outputs_and_sizes_are_refused_before_any_weight_loads(
    main, model_dir, tmp_path, capsys, no_loading
):
    folder = tmp_path / "dir.mp4"
    folder.mkdir()
    assert _gen(main, model_dir, "--output", str(folder)) == 2
    assert "is a directory; pass a file name" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert _gen(main, model_dir, "--output", str(blocker / "out.mp4")) == 2
    assert "--output" in capsys.readouterr().err
    out = str(tmp_path / "ok.mp4")
    # tiny transformer: rope_max_seq_len 64, VAE 4 x 8 x 8, patch 2
    assert _gen(main, model_dir, "--output", out, "--num-frames", "257") == 2
    err = capsys.readouterr().err
    assert "num_frames=257 needs 65 positions" in err and "largest num_frames it takes: 253" in err
    assert _gen(main, model_dir, "--output", out, "--height", "4096", "--width", "64") == 2
    assert "height=4096 needs 256 positions" in capsys.readouterr().err
    assert _gen(main, model_dir, "--output", out, "--fps", "0") == 2
    assert "--fps must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--guidance-scale", "inf", "must be a finite number"),
        ("--guidance-scale", "nan", "must be a finite number"),
        ("--flow-shift", "inf", "must be a finite number"),
        ("--sparsity", "nan", "must be a finite number"),
        ("--fps", "inf", "must be a finite number"),
        ("--seed", "-1", r"must be in \[0, 2\*\*63 - 1\]"),
        ("--seed", str(2**64), r"must be in \[0, 2\*\*63 - 1\]"),
        ("--seed", "1.5", "must be an int"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused_at_the_boundary(
    main, model_dir, capsys, no_loading, flag, value, message
):
    with pytest.raises(SystemExit) as exit_info:
        _gen(main, model_dir, flag, value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err
    assert re.search(message, err)


def test_generate_checks_its_inputs_and_warns_when_a_prompt_is_cut(model_dir):
    from fastwan.pipeline import VideoGenerator

    gen = VideoGenerator.from_pretrained(model_dir, device="cpu")
    small = dict(height=32, width=48, num_frames=5, max_sequence_length=16)
    for kwargs, message in [
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
        (dict(flow_shift=float("inf")), "flow_shift must be a finite number"),
        (dict(seed=-1), r"seed must be an int in \[0, 2\*\*63 - 1\]"),
        (dict(seed=2**64), r"seed must be an int in \[0, 2\*\*63 - 1\]"),
        (dict(timesteps=[1000, float("nan")]), "timesteps must be finite numbers"),
        (dict(output_type="gif"), "output_type must be one of"),
        (dict(num_frames=257), "rotary table"),
    ]:
        with pytest.raises(ValueError, match=message):
            gen.generate("a cat", **{**small, **kwargs})
    long_prompt = " ".join(["a red cat runs on the road"] * 1500)  # ~10 kB
    with pytest.warns(UserWarning, match="longer than the model's 16 text tokens"):
        out = gen.generate(long_prompt, **small, output_type="latent")
    assert out.latents.shape[0] == 1
