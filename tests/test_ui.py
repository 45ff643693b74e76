"""The web UI's handlers (``fastwan.ui.app``) and ``fastwan ui``'s wiring, without a browser.

A tiny random FastWan-layout checkpoint plays the student (few-step DMD, VSA) and the same
folder loaded as plain Wan plays the teacher (multi-step UniPC, CFG, dense). The page's API
is called over HTTP with ``gradio_client``; ``fastwan ui`` itself runs as a subprocess with
the shipped toy models to check that SIGTERM / SIGINT leave no temporary folder.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request

import gradio as gr
import numpy as np
import pytest
from _tiny_wan import build_tiny_wan
from gradio_client import Client

import fastwan.cli as cli
import fastwan.video_io
from fastwan.commands import ui as ui_cmd
from fastwan.pipeline import VideoGenerator
from fastwan.ui import app as ui_app
from fastwan.ui.app import (
    FastWanUI,
    LazyModel,
    format_compare,
    run_compare,
    run_generate,
    size_options,
)
from fastwan.video_io import read_video

STUDENT_PRESET = "fastwan2.1-t2v-1.3b"
TEACHER_PRESET = "wan2.1-t2v-1.3b"
MAX_PIXELS = 64 * 128
PROMPT = "a red cat runs on the grass"


def loader(preset: str, calls: list | None = None):
    def load(source: str) -> VideoGenerator:
        if calls is not None:
            calls.append(source)
        return VideoGenerator.from_pretrained(source, preset=preset, device="cpu")

    return load


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("ui") / "tiny", gates="fastvideo")


def tiny_ui(model_dir, output_dir, **kwargs) -> FastWanUI:
    """The tiny folder as a few-step VSA student and as a many-step dense teacher."""
    return FastWanUI(
        LazyModel("student", str(model_dir), loader(STUDENT_PRESET)),
        LazyModel("teacher", str(model_dir), loader(TEACHER_PRESET)),
        max_frames=9,
        max_pixels=MAX_PIXELS,
        max_sequence_length=16,
        output_dir=output_dir,
        **kwargs,
    )


@pytest.fixture(scope="module")
def ui(model_dir, tmp_path_factory):
    return tiny_ui(model_dir, tmp_path_factory.mktemp("videos"), keep_videos=4)


def gen_args(**changes):
    """Generate's inputs in the page's order, with changes by name."""
    args = dict(
        prompt=PROMPT,
        negative_prompt="",
        seed=3,
        steps=3,
        attention="vsa",
        sparsity=0.5,
        resolution="80x64",
        num_frames=5,
    )
    args.update(changes)
    return list(args.values())


# --------------------------------------------------------------------------- sizes
def test_size_options_of_wan21_are_multiples_of_16_within_the_caps():
    opts = size_options(
        vae_scale=(4, 8),
        patch_size=(1, 2, 2),
        tile_size=(4, 4, 4),
        native=(480, 832, 81),
        max_frames=81,
        max_pixels=480 * 832,
    )
    assert opts.default_resolution == (480, 832) and opts.default_frames == 81
    assert opts.frame_counts == tuple(range(1, 82, 4))
    assert (64, 64) in opts.resolutions  # one 4x4 VSA tile of tokens per side
    assert (256, 448) in opts.resolutions and (448, 256) in opts.resolutions  # 16:9 both ways
    for h, w in opts.resolutions:
        assert h % 16 == 0 and w % 16 == 0 and h * w <= 480 * 832 and min(h, w) >= 64
    assert opts.parse_resolution("832x480") == (480, 832)  # labels are width x height
    assert opts.parse_frames("81") == 81


def test_size_options_follow_the_vae_and_tile_of_other_models():
    wan22 = size_options(
        vae_scale=(4, 16),
        patch_size=(1, 2, 2),
        tile_size=(4, 4, 4),
        native=(704, 1280, 121),
        max_frames=121,
        max_pixels=704 * 1280,
    )
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in wan22.resolutions)
    assert min(min(hw) for hw in wan22.resolutions) == 128
    toy = size_options(  # pixel VAE x4, no temporal factor, 2x2x2 tiles
        vae_scale=(1, 4),
        patch_size=(1, 2, 2),
        tile_size=(2, 2, 2),
        native=(32, 32, 8),
        max_frames=8,
        max_pixels=32 * 32,
    )
    assert toy.frame_counts == tuple(range(1, 9)) and toy.default_frames == 8
    assert toy.default_resolution == (32, 32)
    assert {(16, 16), (16, 32), (32, 16), (32, 32)} <= set(toy.resolutions)


def test_size_options_caps_drop_the_native_size_and_refuse_impossible_caps():
    opts = size_options(
        vae_scale=(4, 8),
        patch_size=(1, 2, 2),
        tile_size=(4, 4, 4),
        native=(480, 832, 81),
        max_frames=33,
        max_pixels=256 * 256,
    )
    assert (480, 832) not in opts.resolutions
    assert opts.default_resolution == opts.resolutions[-1]
    assert max(h * w for h, w in opts.resolutions) <= 256 * 256
    assert opts.frame_counts[-1] == 33 and opts.default_frames == 33
    with pytest.raises(ValueError, match="max_pixels"):
        size_options(
            vae_scale=(4, 8),
            patch_size=(1, 2, 2),
            tile_size=(4, 4, 4),
            native=(480, 832, 81),
            max_frames=81,
            max_pixels=100,
        )
    with pytest.raises(ValueError, match="max_frames"):
        size_options(
            vae_scale=(4, 8),
            patch_size=(1, 2, 2),
            tile_size=(4, 4, 4),
            native=(480, 832, 81),
            max_frames=0,
            max_pixels=480 * 832,
        )


def test_every_offered_size_is_one_the_model_takes(ui):
    model = ui.student_model
    assert ui.options.frame_counts == (1, 5, 9)
    assert len(ui.options.resolutions) >= 3
    for h, w in ui.options.resolutions:
        for f in ui.options.frame_counts:
            model.latent_shape(1, h, w, f)  # raises for a size the model cannot take


def test_sizes_past_the_model_are_not_offered(ui, capsys):
    # 400 frames is past the tiny model's rotary table of 64 latent frames (VAE x4 in time).
    wide = FastWanUI(
        LazyModel.ready("student", ui.student_model), max_frames=400, max_pixels=MAX_PIXELS
    )
    try:
        assert wide.options.frame_counts[-1] == 253
        assert "frame counts left out: [257," in capsys.readouterr().err
        with pytest.raises(ValueError, match="num_frames must be one of"):
            wide.options.parse_frames(257)
    finally:
        wide.close()


# --------------------------------------------------------------------------- generate
def test_generate_writes_a_playable_video_of_the_requested_size(ui):
    steps_seen = []
    res = ui.generate(*gen_args(), callback=steps_seen.append)
    frames, fps = read_video(res.path)
    assert frames.shape == (5, 64, 80, 3) and fps == res.fps
    assert frames.std() > 0
    assert res.path.parent == ui.output_dir
    assert (res.seed, res.height, res.width, res.num_frames) == (3, 64, 80, 5)
    assert set(res.timings) >= {"text_encode", "denoise", "decode", "total"}
    assert all(v >= 0 for v in res.timings.values())
    assert [s["i"] for s in steps_seen] == [0, 1, 2]
    assert res.setup == "VSA 0.5, 3 DMD steps"
    attn = ui.student_model.attention
    assert attn["mode"] == "vsa" and attn["sparsity"] == 0.5


def test_generate_applies_attention_steps_and_seed(ui):
    calls = []
    dense = ui.generate(*gen_args(attention="dense", steps=2), callback=calls.append)
    assert ui.student_model.attention["mode"] == "dense"
    assert len(calls) == 2 and dense.setup == "dense, 2 DMD steps"
    again = ui.generate(*gen_args(attention="dense", steps=2))
    other = ui.generate(*gen_args(attention="dense", steps=2, seed=4))
    a, b, c = (read_video(r.path)[0].astype(np.float32) for r in (dense, again, other))
    assert np.abs(a - b).mean() < 1.0  # same seed: the same video (up to H.264)
    assert np.abs(a - c).mean() > 2.0  # another seed: another video
    # The default steps (0 / None) are the model's own: 3 DMD steps for FastWan.
    assert ui.generate(*gen_args(steps=None, num_frames=1)).setup == "VSA 0.5, 3 DMD steps"


def test_the_output_folder_keeps_only_the_newest_videos(ui):
    paths = [ui.generate(*gen_args(num_frames=1, seed=s)).path for s in range(6)]
    kept = sorted(ui.output_dir.glob("*.mp4"))
    assert len(kept) == ui.keep_videos
    assert paths[-1].exists() and not paths[0].exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prompt", "", "prompt is empty"),
        ("prompt", "   \n ", "prompt is empty"),
        ("prompt", None, "prompt is empty"),
        ("prompt", "a" * 2001, "prompt is 2001 characters"),
        ("prompt", ["a cat"], "prompt must be text"),
        ("negative_prompt", 5, "negative_prompt must be text"),
        ("seed", 1.5, "seed must be a whole number"),
        ("seed", "abc", "seed must be a whole number"),
        ("seed", "1e3", "seed must be a whole number"),
        ("seed", "\u00b2", "seed must be a whole number"),  # a digit to isdigit(), not to int()
        pytest.param(  # past int()'s digit limit
            "seed", "9" * 5000, "seed must be a whole number", id="seed-5000-digits"
        ),
        ("seed", float("nan"), "seed must be a whole number"),
        ("seed", None, "seed must be a whole number"),
        ("seed", -1, "seed must be >= 0"),
        ("seed", "-7", "seed must be >= 0"),
        ("seed", 2**63, r"seed must be at most 9223372036854775807 \(2\*\*63 - 1\)"),
        ("seed", "18446744073709551616", "seed must be at most"),
        ("steps", 4, r"steps must be a whole number in \[1, 3\]"),
        ("steps", -2, "steps must be"),
        ("steps", "abc", "steps must be a whole number"),
        ("steps", float("inf"), "steps must be a whole number"),
        ("attention", "flash", "attention must be one of"),
        ("sparsity", 1.0, r"sparsity must be in \[0, 1\)"),
        ("sparsity", "0.5", "sparsity must be a number"),
        ("sparsity", float("nan"), "sparsity must be a finite number"),
        ("sparsity", float("inf"), "sparsity must be a finite number"),
        ("sparsity", -math.inf, "sparsity must be a finite number"),
        ("sparsity", 10**400, "sparsity must be a finite number"),
        ("resolution", "81x64", "resolution must be one of"),
        ("resolution", "../../etc/passwd", "resolution must be one of"),
        ("resolution", "832x480", "resolution must be one of"),  # above --max-pixels
        ("num_frames", 7, "num_frames must be one of"),
        ("num_frames", 13, "num_frames must be one of"),  # above --max-frames
        ("num_frames", "1000000", "num_frames must be one of"),
        ("num_frames", "nine", "num_frames must be one of"),
    ],
)
def test_invalid_inputs_are_refused_with_the_field_named(ui, field, value, message):
    with pytest.raises(ValueError, match=message):
        ui.generate(*gen_args(**{field: value}))
    # The event adapter raises it as a gr.Error: the message as it is, the field named.
    with pytest.raises(gr.Error) as caught:
        run_generate(ui, *gen_args(**{field: value}))
    assert re.search(message, caught.value.message)
    assert field.split("_")[0] in caught.value.message
    assert "internal error" not in caught.value.message


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("seed", "42", 42),
        ("seed", " 7 ", 7),
        ("seed", 9.0, 9),
        ("seed", ui_app.MAX_SEED, ui_app.MAX_SEED),
        ("seed", str(ui_app.MAX_SEED), ui_app.MAX_SEED),
        ("num_frames", "5", 5),  # as the page and the API list it
        ("num_frames", 5, 5),
    ],
)
def test_valid_text_and_numbers_are_taken(ui, field, value, expected):
    res = ui.generate(*gen_args(**{field: value, "steps": 1}))
    assert getattr(res, field) == expected


def test_the_ui_takes_the_seeds_the_pipeline_takes():
    from fastwan import pipeline

    assert ui_app.MAX_SEED == getattr(pipeline, "MAX_SEED", 2**63 - 1) == 2**63 - 1
    assert ui_app.check_seed(0) == 0 and ui_app.check_seed("+3") == 3


def test_after_an_error_the_handlers_keep_serving(ui):
    with pytest.raises(gr.Error, match="prompt is empty"):
        run_generate(ui, *gen_args(prompt=""))
    video, seed, timings, status = run_generate(ui, *gen_args(num_frames=1, seed=11))
    assert read_video(video)[0].shape == (1, 64, 80, 3)
    assert seed == 11 and "| VSA 0.5, 3 DMD steps |" in timings
    assert status.startswith("Generated 1 frames at 80x64")


def test_an_unexpected_failure_is_a_message_too(ui, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ui.student_model, "generate", boom)
    with pytest.raises(gr.Error) as caught:
        run_generate(ui, *gen_args())
    assert caught.value.message == "internal error (RuntimeError): CUDA out of memory"


SAVE_FAILURES = [
    ValueError(
        "cannot write video '/srv/out/v.mp4': disk full (no space left on device); "
        "free space on that disk or pass another output"
    ),
    OSError(errno.EROFS, "Read-only file system", "/srv/out/v.mp4"),
]


@pytest.mark.parametrize("failure", SAVE_FAILURES, ids=["ValueError", "OSError"])
def test_a_failed_video_write_shows_its_own_message(ui, monkeypatch, failure):
    def failing_save(*args, **kwargs):
        raise failure

    monkeypatch.setattr(fastwan.video_io, "save_video", failing_save)
    with pytest.raises(gr.Error) as caught:
        run_generate(ui, *gen_args(num_frames=1))
    assert caught.value.message == str(failure)  # as save_video says it, not "internal error"


def test_a_video_that_cannot_be_written_is_reported_not_shown(ui, tmp_path):
    broken = FastWanUI(
        LazyModel.ready("student", ui.student_model),
        max_frames=1,
        max_pixels=MAX_PIXELS,
        max_sequence_length=16,
        output_dir=tmp_path / "out",
    )
    (tmp_path / "out").rmdir()
    (tmp_path / "out").write_text("a file where the output folder was")
    with pytest.raises(gr.Error) as caught:
        run_generate(broken, *gen_args(num_frames=1))
    assert str(tmp_path / "out") in caught.value.message
    assert "internal error" not in caught.value.message


def test_concurrent_requests_run_one_at_a_time(ui, monkeypatch):
    model = ui.student_model
    real_generate = model.generate
    active, overlap = [], []

    def tracked(*args, **kwargs):
        active.append(1)
        overlap.append(len(active))
        time.sleep(0.05)  # long enough for the other thread to arrive
        try:
            return real_generate(*args, **kwargs)
        finally:
            active.pop()

    monkeypatch.setattr(model, "generate", tracked)
    results = []
    threads = [
        threading.Thread(target=lambda s=s: results.append(run_generate(ui, *gen_args(seed=s))))
        for s in (21, 22, 23)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert overlap == [1, 1, 1]  # never two generations at once
    assert sorted(r[1] for r in results) == [21, 22, 23]
    assert all(r[3].startswith("Generated") for r in results)


def test_close_removes_the_videos_and_a_temporary_folder(ui, tmp_path):
    kept = FastWanUI(
        LazyModel.ready("student", ui.student_model),
        max_frames=1,
        max_pixels=MAX_PIXELS,
        max_sequence_length=16,
        output_dir=tmp_path / "mine",
    )
    other = tmp_path / "mine" / "notes.txt"
    other.write_text("not a video of the UI")
    path = kept.generate(*gen_args(num_frames=1)).path
    kept.close()
    assert not path.exists() and other.exists()  # a folder given is the user's: kept
    temp = FastWanUI(LazyModel.ready("student", ui.student_model), max_frames=1)
    assert temp.output_dir.is_dir()
    temp.close()
    assert not temp.output_dir.exists()


def test_random_seed_draws_valid_varied_seeds(ui):
    seeds = {ui.random_seed() for _ in range(20)}
    assert len(seeds) > 15 and all(0 <= s <= ui_app.RANDOM_SEED_MAX for s in seeds)
    assert all(ui_app.check_seed(s) == s for s in seeds)


# --------------------------------------------------------------------------- compare
def compare_args(teacher_steps=4, **changes):
    args = gen_args(**changes)
    return args[:4] + [teacher_steps] + args[4:]


def test_compare_runs_teacher_and_student_on_the_same_prompt_and_seed(ui):
    teacher_video, student_video, seed, table, status = run_compare(
        ui, *compare_args(num_frames=5, seed=7)
    )
    t_frames, _ = read_video(teacher_video)
    s_frames, _ = read_video(student_video)
    assert t_frames.shape == s_frames.shape == (5, 64, 80, 3)
    assert seed == 7
    cfg = ui.teacher.peek().preset.guidance_scale  # the teacher preset's CFG scale
    assert f"| teacher (dense, 4 steps, CFG {cfg:g}) |" in table
    assert "| student (VSA 0.5, 3 DMD steps) |" in table
    assert "**Speedup (teacher time / student time):" in table
    assert re.search(r"the student is \d+\.\dx (faster|slower)\.", status)
    res = ui.compare(*compare_args(num_frames=1))
    assert res.speedup == pytest.approx(res.teacher.timings["total"] / res.student.timings["total"])
    assert f"student time): {res.speedup:.1f}x**" in format_compare(res)
    assert ui.teacher.peek().attention["mode"] == "dense"  # the teacher keeps its attention


def test_compare_validates_teacher_steps_and_needs_a_teacher(ui, model_dir):
    with pytest.raises(ValueError, match=r"teacher_steps must be a whole number in \[1, 100\]"):
        ui.compare(*compare_args(teacher_steps=101))
    alone = FastWanUI(
        LazyModel.ready("student", ui.student_model), None, max_frames=9, max_pixels=MAX_PIXELS
    )
    with pytest.raises(gr.Error, match="--teacher"):
        run_compare(alone, *compare_args())


def test_a_teacher_that_fails_to_load_is_reported_and_retried(ui, tmp_path):
    calls = []
    broken = FastWanUI(
        LazyModel.ready("student", ui.student_model),
        LazyModel("teacher", str(tmp_path / "missing"), loader(TEACHER_PRESET, calls)),
        max_frames=9,
        max_pixels=MAX_PIXELS,
        max_sequence_length=16,
        output_dir=tmp_path / "out",
    )
    for _ in range(2):
        with pytest.raises(gr.Error) as caught:
            run_compare(broken, *compare_args())
        assert "the teacher model failed to load from" in caught.value.message
        assert "missing" in caught.value.message
    assert len(calls) == 2  # tried again, not cached as broken
    video = run_generate(broken, *gen_args(num_frames=1))[0]  # the student still serves
    assert read_video(video)[0].shape[0] == 1


# --------------------------------------------------------------------------- app and CLI
def test_build_app_queues_one_at_a_time_and_disables_analytics(ui, monkeypatch):
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    app = ui_app.build_app(ui, queue_size=5)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert app.analytics_enabled is False
    assert app._queue.max_size == 5
    fns = {f.name: f for f in app.fns.values()}
    for name, api_name in (("on_generate", "generate"), ("on_compare", "compare")):
        assert fns[name].concurrency_limit == 1 and fns[name].concurrency_id == "model"
        assert fns[name].queue and fns[name].api_name == api_name
        assert fns[name].preprocess is False  # the handlers check the values as sent
    config = app.get_config_file()
    kinds = {c.get("props", {}).get("elem_id"): c["type"] for c in config["components"]}
    assert kinds["resolution"] == "dropdown" and kinds["frames"] == "dropdown"
    assert kinds["video"] == "video" and kinds["prompt"] == "textbox"
    assert kinds["seed"] == "textbox"  # 64-bit seeds: a browser's numbers lose digits
    with pytest.raises(ValueError, match="queue_size"):
        ui_app.build_app(ui, queue_size=0)


@pytest.fixture()
def main(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["fastwan.commands.ui"])
    return cli.main


def test_ui_command_builds_the_page_and_binds_loopback_by_default(
    main, model_dir, monkeypatch, capsys
):
    served = {}

    def fake_launch(app, *, host, port, block):
        served.update(app=app, host=host, port=port, block=block)

    monkeypatch.setattr(ui_app, "launch", fake_launch)
    handlers = {sig: signal.getsignal(sig) for sig in ui_cmd.STOP_SIGNALS}
    rc = main(
        [
            "ui",
            "--model",
            str(model_dir),
            "--preset",
            STUDENT_PRESET,
            "--device",
            "cpu",
            "--max-frames",
            "5",
            "--max-pixels",
            str(MAX_PIXELS),
            "--port",
            "7999",
        ]
    )
    assert rc == 0
    assert {sig: signal.getsignal(sig) for sig in ui_cmd.STOP_SIGNALS} == handlers  # restored
    assert served["host"] == "127.0.0.1" and served["port"] == 7999 and served["block"]
    err = capsys.readouterr().err
    assert "http://127.0.0.1:7999" in err and "warning" not in err
    assert served["app"]._queue.max_size == 16
    config = served["app"].get_config_file()
    frames = next(c for c in config["components"] if c["props"].get("elem_id") == "frames")
    assert [c[1] for c in frames["props"]["choices"]] == ["1", "5"]


def test_ui_command_warns_when_serving_beyond_loopback(main, model_dir, monkeypatch, capsys):
    served, loads = {}, []
    monkeypatch.setattr(ui_app, "launch", lambda app, **kw: served.update(kw))
    original = VideoGenerator.from_pretrained

    def from_pretrained(source, **kwargs):
        loads.append(kwargs)
        return original(source, **kwargs)

    monkeypatch.setattr(VideoGenerator, "from_pretrained", staticmethod(from_pretrained))
    argv = ["ui", "--model", str(model_dir), "--preset", STUDENT_PRESET, "--device", "cpu"]
    assert main(argv + ["--host", "0.0.0.0", "--max-frames", "1", "--cpu-offload"]) == 0
    assert served["host"] == "0.0.0.0"
    assert "warning: serving on 0.0.0.0" in capsys.readouterr().err
    # The model flags reach the loader (the student only: no teacher without --teacher).
    assert len(loads) == 1 and loads[0]["cpu_offload"] and loads[0]["preset"] == STUDENT_PRESET


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "0"], "--port must be in"),
        (["--max-frames", "0"], "--max-frames must be >= 1"),
        (["--queue-size", "0"], "--queue-size must be >= 1"),
        (["--max-pixels", "10"], "max_pixels=10 is below the smallest size"),
        (["--examples", "no-such-file.txt"], "does not exist"),
        (["--toy", "i2v"], "--toy picks the shipped toy models: pass it without --model"),
    ],
)
def test_ui_command_refuses_bad_flags(main, model_dir, capsys, flags, message):
    argv = ["ui", "--model", str(model_dir), "--preset", STUDENT_PRESET, "--device", "cpu"]
    assert main(argv + flags) == 2
    assert message in capsys.readouterr().err


def test_ui_command_reports_a_model_that_fails_to_load(main, tmp_path, capsys):
    assert main(["ui", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "the student model failed to load" in err and "nope" in err


def test_default_models_ask_for_model_when_the_toy_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastwan.toy.assets", None)  # import fails
    with pytest.raises(ValueError, match="pass --model PATH_OR_ID"):
        ui_cmd.toy_model("student")
    missing = types.ModuleType("fastwan.toy.assets")

    def toy_model_path(name):
        raise ValueError(f"the toy toy-{name} weights are missing")

    missing.toy_model_path = toy_model_path
    monkeypatch.setitem(sys.modules, "fastwan.toy.assets", missing)
    with pytest.raises(ValueError, match="weights are missing.*pass --teacher PATH_OR_ID"):
        ui_cmd.toy_model("teacher")


def test_is_loopback():
    assert ui_cmd.is_loopback("127.0.0.1") and ui_cmd.is_loopback("::1")
    assert ui_cmd.is_loopback("localhost")
    assert not ui_cmd.is_loopback("0.0.0.0") and not ui_cmd.is_loopback("192.168.1.5")


def test_toy_examples_are_prompts_of_the_toy_grammar():
    world = pytest.importorskip("fastwan.toy.world", reason="the toy world is not installed")
    examples = ui_cmd.toy_examples(4)
    combos = [world.parse_prompt(e) for e in examples]
    assert len(set(examples)) == 4
    for name in ("shape", "color", "direction"):
        assert len({getattr(c, name) for c in combos}) >= 3  # the examples differ


def test_ui_command_reports_a_port_it_cannot_serve_on(
    main, model_dir, monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its temporary folder goes
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["ui", "--model", str(model_dir), "--preset", STUDENT_PRESET, "--device", "cpu"]
        assert main(argv + ["--max-frames", "1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}" in err and "pass a free --port" in err
    assert not list(tmp_path.glob("fastwan-ui-*"))  # its folder is removed on this way out too


# --------------------------------------------------------------------------- stop signals
def test_stop_signals_stop_the_server_once_and_restore_the_handlers():
    before = {sig: signal.getsignal(sig) for sig in ui_cmd.STOP_SIGNALS}
    for sig in ui_cmd.STOP_SIGNALS:
        with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name):
            with ui_cmd.stop_on_signals():
                os.kill(os.getpid(), sig)
                time.sleep(1)  # the handler runs between bytecodes of the main thread
        assert {s: signal.getsignal(s) for s in ui_cmd.STOP_SIGNALS} == before
    # While stopping (the cleanup runs), a repeated signal is ignored.
    with ui_cmd.stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)  # would kill this process if not ignored
            time.sleep(0.2)
    # A signal the parent set to be ignored stays ignored.
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with ui_cmd.stop_on_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


def test_importing_the_ui_installs_no_signal_handler():
    code = (
        "import signal, fastwan.cli, fastwan.commands.ui, fastwan.ui.app, fastwan.ui; "
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL; "
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(ui: FastWanUI):
    """``ui``'s page served on a free loopback port: a gradio_client Client on it."""
    app = ui_app.build_app(ui, queue_size=4)
    port = free_port()
    ui_app.launch(app, host="127.0.0.1", port=port, block=False)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"fastwan ui exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"fastwan ui did not serve {url} within {timeout} s")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_fastwan_ui_removes_its_temporary_folder_when_stopped(tmp_path, stop):
    pytest.importorskip("fastwan.toy.assets", reason="the toy world is not installed")
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    env = dict(os.environ, TMPDIR=str(temp), GRADIO_TEMP_DIR=str(temp / "gradio"))
    argv = [sys.executable, "-m", "fastwan.cli", "ui", "--port", str(port), "--device", "cpu"]
    with open(tmp_path / "stderr.txt", "w") as log:  # a file: a full pipe cannot block it
        # The shipped toy student and teacher (no --model), on loopback.
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, proc)
        (folder,) = temp.glob("fastwan-ui-*")
        if stop == signal.SIGTERM:  # one video through the API first: the folder is not empty
            client = Client(url, verbose=False)
            frames = client.view_api(print_info=False, return_format="dict")
            listed = next(
                p["type"]["enum"]
                for p in frames["named_endpoints"]["/generate"]["parameters"]
                if p["parameter_name"] == "num_frames"
            )
            assert listed[-1] == "8"  # the toy's frame counts, listed as text ...
            inputs = ["a red square moves left", "", "3", 0, "vsa", 0.5, "16x16", "8"]
            out = client.predict(*inputs, api_name="/generate")
            assert "Generated 8 frames" in out[3]  # ... and taken as listed
            assert list(folder.glob("*.mp4"))
        proc.send_signal(stop)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = (tmp_path / "stderr.txt").read_text()
    assert "stopped; its videos and temporary folder are removed" in log_text, log_text
    assert not folder.exists() and not list(temp.glob("fastwan-ui-*"))
    assert not [f for f in (temp / "gradio").rglob("*") if f.is_file()]  # nor Gradio's copies


# --------------------------------------------------------------------------- the HTTP API
@pytest.fixture(scope="module")
def api(ui):
    """The page served on a free loopback port, and a gradio_client Client on it."""
    with served(ui) as client:
        yield client


GEN_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "attention",
    "sparsity",
    "resolution",
    "num_frames",
)


def api_args(**changes):
    args = dict(zip(GEN_FIELDS, gen_args(num_frames="1", seed="3", steps=1)))
    args.update(changes)
    return list(args.values())


def test_the_api_declares_what_it_takes(api):
    endpoints = api.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/generate", "/compare", "/random_seed"}
    params = {p["parameter_name"]: p["type"] for p in endpoints["/generate"]["parameters"]}
    assert tuple(params) == GEN_FIELDS  # each input by its field's name
    assert params["num_frames"] == {"type": "string", "enum": ["1", "5", "9"]}
    assert params["seed"]["type"] == "string"
    # What it lists is taken, and so are ints.
    for frames in ("5", 5):
        video, seed, timings, status = api.predict(
            *api_args(num_frames=frames), api_name="/generate"
        )
        assert status.startswith("Generated 5 frames") and seed == "3"
        assert read_video(video)[0].shape[0] == 5
    big = str(ui_app.MAX_SEED)  # every digit of a 64-bit seed arrives
    assert api.predict(*api_args(seed=big), api_name="/generate")[1] == big


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seed", "abc", "seed must be a whole number, got 'abc'"),
        ("seed", -1, "seed must be >= 0"),
        ("seed", 2**63, "seed must be at most 9223372036854775807"),
        ("seed", 1.5, "seed must be a whole number"),
        ("steps", "abc", "steps must be a whole number in [1, 3]"),
        ("attention", "flash", "attention must be one of"),
        ("sparsity", "lots", "sparsity must be a number"),
        ("resolution", "../../etc/passwd", "resolution must be one of"),
        ("num_frames", "8", "num_frames must be one of ['1', '5', '9']"),
        ("num_frames", 10**6, "num_frames must be one of"),
        ("prompt", "", "prompt is empty"),
    ],
)
def test_a_bad_api_value_is_refused_with_its_field_named(api, field, value, message):
    with pytest.raises(Exception) as caught:  # gradio_client's AppError
        api.predict(*api_args(**{field: value}), api_name="/generate")
    text = str(caught.value)
    assert message in text and "upstream" not in text and "internal error" not in text
    # The server keeps serving.
    assert api.predict(*api_args(), api_name="/generate")[3].startswith("Generated 1 frames")


def test_compare_over_the_api_names_the_bad_field(api):
    args = api_args(seed="x")
    with pytest.raises(Exception, match="seed must be a whole number"):
        api.predict(*args[:4], 2, *args[4:], api_name="/compare")


@pytest.mark.parametrize("failure", SAVE_FAILURES, ids=["ValueError", "OSError"])
def test_a_failed_video_write_reaches_the_api_client(api, monkeypatch, failure):
    def failing_save(*args, **kwargs):
        raise failure

    monkeypatch.setattr(fastwan.video_io, "save_video", failing_save)
    with pytest.raises(Exception) as caught:
        api.predict(*api_args(), api_name="/generate")
    assert str(failure) in str(caught.value) and "internal error" not in str(caught.value)


# --------------------------------------------------------------------------- image to video
@pytest.fixture(scope="module")
def i2v_ui(tmp_path_factory):
    """The shipped toy image-to-video pair (TI2V-style): student and teacher."""
    return FastWanUI(
        LazyModel("student", "toy-i2v-student", loader(None)),
        LazyModel("teacher", "toy-i2v-teacher", loader(None)),
        max_pixels=32 * 64,
        output_dir=tmp_path_factory.mktemp("i2v-videos"),
    )


def toy_first_frame(tmp_path, seed: int = 3):
    """A real toy I2V clip's first frame, as a PNG file, and the clip's prompt."""
    from PIL import Image

    from fastwan.toy import i2v, world

    combo = sorted(world.HELD_OUT, key=world.canonical_prompt)[seed % len(world.HELD_OUT)]
    frame = i2v.render_i2v_batch([combo], [seed])[0, 0]  # [H, W, 3] in [0, 1]
    path = tmp_path / f"first-{seed}.png"
    Image.fromarray((frame * 255).round().astype(np.uint8)).save(path)
    return path, frame, world.canonical_prompt(combo)


def i2v_args(prompt, **changes):
    return gen_args(prompt=prompt, steps=3, sparsity=0.75, resolution="16x16", **changes)


def test_image_to_video_starts_from_the_uploaded_frame(i2v_ui, tmp_path):
    assert i2v_ui.takes_image
    path, frame, prompt = toy_first_frame(tmp_path)
    res = i2v_ui.image_to_video(path, *i2v_args(prompt, num_frames=8))
    frames, _ = read_video(res.path)
    assert frames.shape == (8, 16, 16, 3) and res.setup.endswith("from the image")
    # the first frame is the given one (up to the MP4 codec), and later frames move on
    assert np.abs(frames[0] / 255.0 - frame).mean() < 0.05
    assert np.abs(frames[-1] / 255.0 - frame).mean() > np.abs(frames[0] / 255.0 - frame).mean()
    other, _, _ = toy_first_frame(tmp_path, seed=4)
    res2 = i2v_ui.image_to_video(other, *i2v_args(prompt, num_frames=8))
    assert np.abs(read_video(res2.path)[0][0] / 255.0 - frame).mean() > 0.05
    with pytest.raises(ValueError, match="image: upload the first frame"):
        i2v_ui.image_to_video(None, *i2v_args(prompt))
    with pytest.raises(ValueError, match="image: .* is not a file"):
        i2v_ui.image_to_video(tmp_path / "missing.png", *i2v_args(prompt))


def test_compare_takes_an_image_and_needs_an_i2v_teacher(i2v_ui, ui, tmp_path):
    path, frame, prompt = toy_first_frame(tmp_path)
    args = i2v_args(prompt, num_frames=8)
    res = i2v_ui.compare(*args[:4], 4, *args[4:], image=path)
    for video in (res.teacher, res.student):
        first = read_video(video.path)[0][0] / 255.0
        assert np.abs(first - frame).mean() < 0.05, video.setup
    # a text-to-video student refuses an image; so does a text-to-video teacher
    assert not ui.takes_image
    with pytest.raises(ValueError, match="image: .* is a text-to-video model"):
        ui.generate(*gen_args(num_frames=1), image=path)
    mixed = FastWanUI(i2v_ui.student, ui.teacher, max_pixels=32 * 64, output_dir=tmp_path)
    with pytest.raises(ValueError, match="the teacher .* is a text-to-video model"):
        mixed.compare(*args[:4], 4, *args[4:], image=path)


def test_an_uploaded_image_picks_the_resolution_of_its_aspect(i2v_ui):
    from PIL import Image

    labels = i2v_ui.options.resolution_labels
    sizes = [tuple(map(int, label.split("x"))) for label in labels]  # (width, height)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    for width, height in ((64, 32), (32, 64), (40, 40)):
        label = i2v_ui.resolution_for_image(Image.new("RGB", (width, height)))
        w, h = map(int, label.split("x"))
        assert label in labels and (w > h) == (width > height) and (h > w) == (height > width)


def test_only_uploads_are_read_from_the_page(tmp_path):
    from gradio.utils import get_upload_folder

    assert ui_app.uploaded_image(None) is None and ui_app.uploaded_image("") is None
    with pytest.raises(ValueError, match="not an uploaded file"):
        ui_app.uploaded_image({"path": str(tmp_path / "x.png")})
    with pytest.raises(ValueError, match="not an uploaded file"):
        ui_app.uploaded_image(os.path.join(get_upload_folder(), "..", "etc", "passwd"))
    with pytest.raises(ValueError, match="image must be an uploaded image file"):
        ui_app.uploaded_image({"url": "http://example.com/a.png"})
    inside = os.path.join(get_upload_folder(), "abc", "a.png")
    assert ui_app.uploaded_image({"path": inside}) == ui_app.Path(inside).resolve()


def test_image_to_video_over_the_api(i2v_ui, tmp_path):
    from gradio_client import handle_file

    with served(i2v_ui) as client:
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert set(endpoints) == {"/generate", "/image_to_video", "/compare", "/random_seed"}
        names = [p["parameter_name"] for p in endpoints["/image_to_video"]["parameters"]]
        assert names == ["image", *GEN_FIELDS]
        path, frame, prompt = toy_first_frame(tmp_path)
        args = dict(zip(GEN_FIELDS, i2v_args(prompt, num_frames="8", seed="3")))
        video, seed, _, status = client.predict(
            handle_file(str(path)), *args.values(), api_name="/image_to_video"
        )
        assert status.startswith("Generated 8 frames at 16x16") and seed == "3"
        assert np.abs(read_video(video)[0][0] / 255.0 - frame).mean() < 0.05
        # a path of the server's machine is not an upload: Gradio's own payload check refuses
        # it before the handler (whose check, uploaded_image, is tested above)
        with pytest.raises(Exception):  # noqa: B017 - gradio_client's AppError
            client.predict(str(path), *args.values(), api_name="/image_to_video")
        video, *_ = client.predict(
            handle_file(str(path)), *args.values(), api_name="/image_to_video"
        )
        assert read_video(video)[0].shape == (8, 16, 16, 3)  # and it keeps serving


def test_ui_command_serves_the_toy_i2v_pair_with_an_image_tab(main, monkeypatch):
    served = {}
    monkeypatch.setattr(ui_app, "launch", lambda app, **kw: served.update(app=app))
    assert main(["ui", "--toy", "i2v", "--device", "cpu"]) == 0
    config = served["app"].get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"image", "generate-image", "image-video", "compare-image"} <= ids
    markdown = " ".join(str(c["props"].get("value")) for c in config["components"])
    assert "toy-i2v-student" in markdown


def test_a_wan21_i2v_student_has_no_text_to_video_tab(tmp_path):
    from _tiny_wan import build_tiny_wan_i2v

    folder = build_tiny_wan_i2v(tmp_path / "i2v")
    i2v = FastWanUI(LazyModel("student", str(folder), loader(None)), output_dir=tmp_path / "v")
    assert i2v.takes_image
    config = ui_app.build_app(i2v).get_config_file()
    tabs = {
        c["props"].get("label"): c["props"] for c in config["components"] if c["type"] == "tabitem"
    }
    assert tabs["Generate"]["visible"] is False and tabs["Image to video"]["visible"] is not False
    with pytest.raises(ValueError, match="is an image-to-video model: pass image="):
        i2v.generate(*gen_args(prompt=PROMPT, resolution=i2v.options.resolution_labels[0]))


def _png(tmp_path, name: str, seed: int, h: int = 32, w: int = 48):
    rng = np.random.default_rng(seed)
    from PIL import Image

    path = tmp_path / f"{name}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_a_first_last_frame_student_takes_both_frames_on_the_page_and_the_api(tmp_path):
    from _tiny_wan import build_tiny_wan_i2v
    from gradio_client import handle_file

    folder = build_tiny_wan_i2v(tmp_path / "flf2v", flf2v=True)
    flf = FastWanUI(
        LazyModel("student", str(folder), loader(None)),
        LazyModel("teacher", str(folder), loader(None)),
        max_pixels=32 * 48,
        max_frames=5,
        max_sequence_length=16,
        output_dir=tmp_path / "v",
    )
    assert flf.takes_image and flf.takes_last_image
    ids = {c["props"].get("elem_id") for c in ui_app.build_app(flf).get_config_file()["components"]}
    assert {"image", "last-image", "compare-image", "compare-last-image"} <= ids
    first, last, other = (_png(tmp_path, n, i) for i, n in enumerate(("first", "last", "other")))
    args = gen_args(steps=2, attention="dense", resolution="48x32", num_frames=5)
    res = flf.image_to_video(first, *args, last_image=last)
    assert res.setup.endswith("from the images") and (res.num_frames, res.height) == (5, 32)
    moved = flf.image_to_video(first, *args, last_image=other)
    # the last frame reaches the model: another last frame, another video
    diff = np.abs(read_video(res.path)[0].astype(np.float32) - read_video(moved.path)[0])
    assert diff.mean() > 1.0
    with pytest.raises(ValueError, match="last_image: .* first-last-frame model; upload the last"):
        flf.image_to_video(first, *args)
    with pytest.raises(ValueError, match="last_image: upload the first frame too"):
        flf.generate(*args, last_image=last)
    pair = flf.compare(*args[:4], 2, *args[4:], image=first, last_image=last)
    assert pair.student.setup.endswith("from the images")
    with served(flf) as client:
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        names = [p["parameter_name"] for p in endpoints["/image_to_video"]["parameters"]]
        assert names == ["image", "last_image", *GEN_FIELDS]
        names = [p["parameter_name"] for p in endpoints["/compare"]["parameters"]]
        assert names[-2:] == ["image", "last_image"]
        api = [str(a) for a in args]
        *_, status = client.predict(
            handle_file(str(first)), handle_file(str(last)), *api, api_name="/image_to_video"
        )
        assert status.startswith("Generated 5 frames at 48x32") and "from the images" in status
        with pytest.raises(Exception, match="last_image: .* upload the last frame"):
            client.predict(handle_file(str(first)), None, *api, api_name="/image_to_video")


def test_a_first_frame_model_refuses_a_last_frame(i2v_ui, tmp_path):
    path, _, prompt = toy_first_frame(tmp_path)
    assert not i2v_ui.takes_last_image
    with pytest.raises(ValueError, match="last_image: .*takes the first frame only"):
        i2v_ui.image_to_video(path, *i2v_args(prompt, num_frames=8), last_image=path)


# --------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_ui(model_dir, tmp_path_factory):
    """The student with a LoRA folder (fastwan's export of a rank-4 adapter and its gates),
    offered at scale 0.8."""
    from test_lora_files import _adapted

    from fastwan.models.lora import save_lora

    lora = tmp_path_factory.mktemp("ui-loras") / "style_a"
    save_lora(_adapted(model_dir, gates=True), lora, "generator")
    return tiny_ui(model_dir, tmp_path_factory.mktemp("lora-videos"), loras=[(lora, 0.8)])


def test_a_lora_is_picked_per_request_with_its_scale(lora_ui):
    assert lora_ui.lora_defaults == {"style_a": 0.8}
    model = lora_ui.student_model
    base = lora_ui.generate(*gen_args(num_frames=1), lora="none")
    assert model.loras == {"style_a": 0.0} and "LoRA" not in base.setup
    styled = lora_ui.generate(*gen_args(num_frames=1), lora="style_a")  # its default scale
    assert model.loras == {"style_a": 0.8} and styled.setup.endswith("LoRA style_a x0.8")
    half = lora_ui.generate(*gen_args(num_frames=1), lora="style_a", lora_scale="0.5")
    assert model.loras == {"style_a": 0.5}
    frames = [read_video(r.path)[0].astype(np.float32) for r in (base, styled, half)]
    # the LoRA changes the video (identical frames would encode identically)
    assert np.abs(frames[1] - frames[0]).mean() > 0.1
    # a scale between: a video between (up to the codec)
    assert np.abs(frames[2] - frames[0]).mean() < np.abs(frames[1] - frames[0]).mean()
    table = format_compare(lora_ui.compare(*compare_args(num_frames=1), lora="style_a"))
    assert "student (VSA 0.5, 3 DMD steps, LoRA style_a x0.8)" in table
    assert "LoRA" not in table.split("student (")[0]  # the teacher runs without it


@pytest.mark.parametrize(
    "lora, scale, message",
    [
        ("other", None, "lora must be one of ['none', 'style_a'], got 'other'"),
        ("style_a", 3, "lora_scale must be a number in [0, 2], got 3"),
        ("style_a", "lots", "lora_scale must be a number in [0, 2], got 'lots'"),
        ("style_a", float("nan"), "lora_scale must be a number in [0, 2]"),
    ],
)
def test_bad_lora_requests_name_the_field(lora_ui, lora, scale, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lora_ui.generate(*gen_args(num_frames=1), lora=lora, lora_scale=scale)


def test_a_ui_without_loras_refuses_one_and_its_api_has_none(ui, lora_ui):
    with pytest.raises(ValueError, match="started without LoRAs.*--lora PATH"):
        ui.generate(*gen_args(num_frames=1), lora="style_a")
    with served(lora_ui) as client:
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        names = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
        assert names == [*GEN_FIELDS, "lora", "lora_scale"]
        *_, status = client.predict(*api_args(), "style_a", 0.5, api_name="/generate")
        assert status.startswith("Generated 1 frames") and "LoRA style_a x0.5" in status
        with pytest.raises(Exception, match="lora must be one of"):
            client.predict(*api_args(), "nope", 0.5, api_name="/generate")


def test_ui_command_checks_each_lora_before_loading(main, model_dir, capsys, tmp_path):
    argv = ["ui", "--model", str(model_dir), "--preset", STUDENT_PRESET, "--device", "cpu"]
    assert main([*argv, "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
