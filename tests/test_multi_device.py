"""One video on 2 processes (gloo, CPU) equals one process: sequence parallel, CFG parallel,
FSDP-sharded weights, image-to-video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_wan import build_tiny_wan
from PIL import Image

from fastwan.multi_device import check_num_gpus
from fastwan.pipeline import VideoGenerator

SMALL = dict(height=32, width=48, num_frames=5, max_sequence_length=16)
CFG = dict(num_inference_steps=2, guidance_scale=4.0, negative_prompt="blurry")


@pytest.fixture(scope="module")
def fastwan21(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("fastwan21"), gates="fastvideo", seed=5)


@pytest.fixture(scope="module")
def one(fastwan21):
    return VideoGenerator.from_pretrained(
        fastwan21, preset="fastwan2.1-t2v-1.3b", sparsity=0.5, device="cpu"
    )


def test_two_processes_equal_one(fastwan21, one):
    steps = []
    with VideoGenerator.from_pretrained(
        fastwan21, preset="fastwan2.1-t2v-1.3b", sparsity=0.5, device="cpu", num_gpus=2
    ) as two:
        # CFG parallel: one branch per process
        a = two.generate("a red cat runs", seed=3, callback=steps.append, **CFG, **SMALL)
        # no CFG (3 DMD steps, VSA): the tokens split over both processes
        b = two.generate(["a cat", "a blue fish swims"], seed=4, **SMALL)
        with pytest.raises(ValueError, match="height=40 is not a multiple of 16"):
            two.generate("a cat", height=40, width=48, num_frames=5)
        c = two.generate("a dog", seed=1, output_type="latent", **SMALL)  # still serving
    ref_a = one.generate("a red cat runs", seed=3, **CFG, **SMALL)
    ref_b = one.generate(["a cat", "a blue fish swims"], seed=4, **SMALL)
    np.testing.assert_allclose(a.frames, ref_a.frames, rtol=0, atol=2e-5)
    np.testing.assert_allclose(b.frames, ref_b.frames, rtol=0, atol=2e-5)
    assert b.sampler == "dmd" and b.frames.shape == (2, 5, 32, 48, 3)
    assert [s["i"] for s in steps] == [0, 1] and steps[0]["total"] == 2
    assert c.latents.shape == (1, 16, 2, 4, 6)


def test_sequence_parallel_without_cfg_parallel_and_sharded_weights(fastwan21, one):
    with VideoGenerator.from_pretrained(
        fastwan21,
        preset="fastwan2.1-t2v-1.3b",
        sparsity=0.5,
        device="cpu",
        num_gpus=2,
        cfg_parallel=False,
        fsdp=True,
    ) as two:
        a = two.generate("a red cat runs", seed=3, **CFG, **SMALL)
    ref = one.generate("a red cat runs", seed=3, **CFG, **SMALL)
    np.testing.assert_allclose(a.frames, ref.frames, rtol=0, atol=2e-5)


def test_image_to_video_on_two_processes(tmp_path):
    path = build_tiny_wan(tmp_path / "ti2v", variant="wan2.2")
    image = Image.fromarray(
        (np.random.default_rng(0).uniform(0, 255, (64, 96, 3))).astype(np.uint8)
    )
    kw = dict(image=image, height=64, width=96, num_frames=5, max_sequence_length=16, seed=2)
    ref = VideoGenerator.from_pretrained(path, device="cpu").generate("a cat", **kw, **CFG)
    with VideoGenerator.from_pretrained(path, device="cpu", num_gpus=2) as two:
        out = two.generate("a cat", **kw, **CFG)
    torch.testing.assert_close(out.latents, ref.latents, rtol=1e-4, atol=1e-4)


def test_num_gpus_that_cannot_split_the_heads_are_refused(fastwan21):
    check_num_gpus(2, 2)  # 2 heads over 2 devices; CFG halves of 1
    with pytest.raises(ValueError, match=r"2 attention heads do not divide over 4 devices"):
        check_num_gpus(4, 2)
    with pytest.raises(ValueError, match="num_gpus must be an int >= 1"):
        check_num_gpus(0, 2)
    with pytest.raises(ValueError, match="heads do not divide"):
        VideoGenerator.from_pretrained(fastwan21, device="cpu", num_gpus=3)
    with pytest.raises(ValueError, match="fsdp=True shards over several devices"):
        VideoGenerator.from_pretrained(fastwan21, device="cpu", fsdp=True)
    with pytest.raises(ValueError, match="callback_on_step_end is not available"):
        from fastwan.multi_device import MultiDeviceGenerator

        MultiDeviceGenerator.generate(
            object.__new__(MultiDeviceGenerator), "a", callback_on_step_end=print
        )


def _write_lora(model, path, rank: int = 2):
    """A diffusers-format LoRA of every block's self-attention q / v projections."""
    import json

    from safetensors.torch import save_file

    config = json.loads((model / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(config["num_layers"]):
        for proj in ("to_q", "to_v"):
            key = f"transformer.blocks.{i}.attn1.{proj}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, dim, generator=g) / dim**0.5
            state[f"{key}.lora_B.weight"] = torch.randn(dim, rank, generator=g)
    save_file(state, str(path))
    return path


def test_callback_stop_and_checks_in_the_parent(fastwan21, one, tmp_path):
    """A callback that raises stops the call on both processes at that step; the pair
    serves the next call. check_inputs runs in the parent, on the weightless model;
    set_attention and LoRA loading reach both processes."""
    from fastwan.multi_device import MultiDeviceGenerator

    class Stop(Exception):
        pass

    def stop_after_first(info):
        if info["i"] >= 0:
            raise Stop

    with MultiDeviceGenerator(
        fastwan21, 2, devices=["cpu", "cpu"], preset="fastwan2.1-t2v-1.3b", sparsity=0.5
    ) as two:
        assert two.devices == ("cpu", "cpu") and two.alive
        plan = two.check_inputs("a cat", **SMALL)
        assert plan == one.check_inputs("a cat", **SMALL)
        assert two.attention["mode"] == "vsa" and two.attention["sparsity"] == 0.5
        with pytest.raises(Stop):
            two.generate("a cat", seed=1, num_inference_steps=50, callback=stop_after_first,
                         **SMALL)  # fmt: skip
        two.set_attention("dense")  # on both processes
        assert two.attention["mode"] == "dense"
        a = two.generate("a red cat runs", seed=3, **CFG, **SMALL)
        lora = _write_lora(fastwan21, tmp_path / "s.safetensors")
        assert two.load_lora(lora, scale=0.7, adapter_name="s") == "s"  # on both
        b = two.generate("a red cat runs", seed=3, **CFG, **SMALL)
        two.unload_lora("s")
    one.set_attention("dense")
    try:
        ref = one.generate("a red cat runs", seed=3, **CFG, **SMALL)
        one.load_lora(lora, scale=0.7, adapter_name="s")
        ref_b = one.generate("a red cat runs", seed=3, **CFG, **SMALL)
    finally:
        one.unload_lora()
        one.set_attention("vsa", sparsity=0.5)
    np.testing.assert_allclose(a.frames, ref.frames, rtol=0, atol=2e-5)
    np.testing.assert_allclose(b.frames, ref_b.frames, rtol=0, atol=2e-5)
    assert np.abs(b.frames - a.frames).max() > 1e-2  # the adapter ran
    with pytest.raises(ValueError, match="one per process"):
        MultiDeviceGenerator(fastwan21, 2, devices=["cpu"])
    # settings the sharded (fsdp) load cannot honour are refused, not silently dropped
    for setting in ("compile", "cpu_offload"):
        with pytest.raises(ValueError, match=rf"^{setting}=True is not supported with fsdp"):
            MultiDeviceGenerator(fastwan21, 2, device="cpu", fsdp=True, **{setting: True})


def _wait(client, job_id, until=("succeeded", "failed", "cancelled"), timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.05)


def test_serve_worker_of_two_processes_equals_one(tmp_path):
    """``fastwan serve --devices cpu,cpu --devices-per-worker 2``: one worker, one video on
    two processes; its MP4 equals a one-process server's; cancelling a running job
    leaves the pair serving."""
    import time

    import httpx

    from fastwan.serve.app import Server
    from fastwan.serve.runtime import ServeOptions
    from fastwan.toy.assets import toy_model_path
    from fastwan.video_io import read_video

    def serve(state, devices, per_worker):
        options = ServeOptions(
            model=str(toy_model_path("student")),
            state_dir=tmp_path / state,
            devices=devices,
            devices_per_worker=per_worker,
        )
        return Server(options, port=0, log_level="warning").start()

    def video(client, job):
        path = tmp_path / f"{job['id']}.mp4"
        path.write_bytes(client.get(job["content_url"]).content)
        return read_video(path)[0].astype(np.int16)

    body = {"prompt": "a red ball moves right", "seed": 7}
    two = serve("two", "cpu,cpu", 2)
    try:
        assert len(two.runtime.workers) == 1
        with httpx.Client(base_url=two.url, timeout=30) as c:
            health = c.get("/health").json()
            assert health["status"] == "ok"
            assert [w["device"] for w in health["workers"]] == ["cpu+cpu"]
            bad = c.post("/v1/videos", json={"prompt": "x", "height": 17})
            assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "height"]
            job = _wait(c, c.post("/v1/videos", json=body).json()["id"])
            assert job["status"] == "succeeded", job
            assert job["progress"] == {"step": 3, "total": 3}
            got = video(c, job)
            # cancel mid-run: both processes stop at the same step
            long_id = c.post("/v1/videos", json={**body, "num_inference_steps": 200}).json()["id"]
            deadline = time.monotonic() + 60
            while c.get(f"/v1/videos/{long_id}").json()["progress"]["step"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.delete(f"/v1/videos/{long_id}").json()["status"] == "cancelled"
            deadline = time.monotonic() + 30
            while two.runtime.workers[0].job is not None:
                assert time.monotonic() < deadline, "the cancelled job kept running"
                time.sleep(0.05)
            long_job = c.get(f"/v1/videos/{long_id}").json()
            assert long_job["status"] == "cancelled" and long_job["progress"]["step"] < 200
            # the pair still serves, on another attention setting too
            after = _wait(c, c.post("/v1/videos", json={**body, "attention": "vsa"}).json()["id"])
            assert after["status"] == "succeeded", after
    finally:
        two.stop()
    assert not two.runtime.workers[0].generator.alive  # stopping closed the processes
    one = serve("one", "cpu", 1)
    try:
        with httpx.Client(base_url=one.url, timeout=30) as c:
            want = video(c, _wait(c, c.post("/v1/videos", json=body).json()["id"]))
    finally:
        one.stop()
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 0.5  # the same video up to float and codec rounding


def test_weightless_checker_checks_as_the_loaded_model(tmp_path):
    """fastwan.inputs.input_checker: check_inputs without weights (what the parent of a
    multi-device generator, and a CLI before its load, check with) plans as the loaded
    model does, image-to-video included, and refuses what it refuses."""
    from _tiny_wan import build_tiny_wan_i2v

    from fastwan.inputs import USER_ARGUMENTS, generate_kwargs, input_checker

    path = build_tiny_wan_i2v(tmp_path / "i2v")
    checker = input_checker(path)
    assert input_checker(path) is checker  # cached
    assert next(checker.transformer.parameters()).is_meta  # no weight was read
    loaded = VideoGenerator.from_pretrained(path, device="cpu")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 80, 3), np.uint8))
    kwargs = generate_kwargs({"prompt": "a cat", "image": image, "num_frames": 5})
    assert set(kwargs) == set(USER_ARGUMENTS) and kwargs["seed"] == 0
    want = loaded.check_inputs(**kwargs)
    got = checker.check_inputs(**kwargs)
    assert {k: v for k, v in got.items() if k != "image"} == {
        k: v for k, v in want.items() if k != "image"
    }
    assert got["image"].size == want["image"].size == (80, 48)
    for bad, message in (
        ({"prompt": "a cat"}, "is an image-to-video model: pass image="),
        ({"prompt": "a cat", "image": image, "height": 64}, "pass both height and width"),
        ({"prompt": "a cat", "image": image, "num_frames": 6}, "num_frames"),
    ):
        for gen in (checker, loaded):
            with pytest.raises(ValueError, match=message):
                gen.check_inputs(**generate_kwargs(bad))
    with pytest.raises(ValueError, match="image_path is not a generate"):
        generate_kwargs({"prompt": "a cat", "image_path": "x.png"})
