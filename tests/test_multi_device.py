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
