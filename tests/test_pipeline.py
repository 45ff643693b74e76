"""VideoGenerator end to end on tiny Diffusers-layout Wan pipelines, and save_video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_wan import build_tiny_wan, tiny_transformer

from fastwan.models import compile_blocks
from fastwan.pipeline import VideoGenerator, parse_dtype
from fastwan.video_io import read_video, save_video

SMALL = dict(height=32, width=48, num_frames=5, max_sequence_length=16)


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan21"))


@pytest.fixture(scope="module")
def fastwan21(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("fastwan21"), gates="fastvideo", seed=5)


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan22"), variant="wan2.2")


@pytest.fixture(scope="module")
def fast_gen(fastwan21):
    return VideoGenerator.from_pretrained(fastwan21, preset="fastwan2.1-t2v-1.3b", device="cpu")


def _diffusers_frames(path, **kw):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    seed = kw.pop("seed")
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames


@pytest.mark.parametrize(
    "variant, preset, size",
    [
        ("wan21", "wan2.1-t2v-1.3b", dict(height=32, width=48)),
        ("wan22", "wan2.2-ti2v-5b", dict(height=64, width=96)),  # 48 channels, per-token t
    ],
)
def test_dense_output_equals_diffusers_wan_pipeline(request, variant, preset, size):
    path = request.getfixturevalue(variant)
    common = dict(
        prompt="a red cat runs on the road",
        negative_prompt="blurry, low quality",
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=5.0,
        max_sequence_length=16,
        seed=11,
        **size,
    )
    ref = _diffusers_frames(path, **common)  # the folder's UniPC scheduler (shift 3), CFG
    gen = VideoGenerator.from_pretrained(path, preset=preset, attention="dense", device="cpu")
    assert gen.components.expand_timesteps == (variant == "wan22")
    out = gen.generate(flow_shift=3.0, **common)
    assert out.frames.shape == ref.shape == (1, 5, size["height"], size["width"], 3)
    np.testing.assert_allclose(out.frames, ref, rtol=0, atol=1e-6)
    assert out.sampler == "scheduler" and len(out.timesteps) == 3
    assert set(out.timings) == {"text_encode", "denoise", "decode", "total"}
    assert all(v >= 0 for v in out.timings.values())


def test_fastwan_runs_three_dmd_steps_with_vsa_and_is_seeded(fast_gen):
    assert fast_gen.attention["mode"] == "vsa" and fast_gen.attention["sparsity"] == 0.8
    a = fast_gen.generate("a dog jumps over the ball", seed=1, **SMALL)
    assert a.sampler == "dmd" and a.timesteps == [1000.0, 757.0, 522.0]
    assert a.frames.shape == (1, 5, 32, 48, 3) and a.frames.dtype == np.float32
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0 and a.frames.std() > 0
    assert a.fps == 16 and a.seed == 1 and a.latents.shape == (1, 16, 2, 4, 6)
    b = fast_gen.generate("a dog jumps over the ball", seed=1, **SMALL)
    assert np.array_equal(a.frames, b.frames)
    c = fast_gen.generate("a dog jumps over the ball", seed=2, **SMALL)
    assert not np.allclose(a.frames, c.frames)
    # An explicit generator is the same as its seed.
    d = fast_gen.generate(
        "a dog jumps over the ball", generator=torch.Generator().manual_seed(1), **SMALL
    )
    assert np.array_equal(a.frames, d.frames) and d.seed is None


def test_custom_timesteps_and_batched_prompts(fast_gen):
    out = fast_gen.generate(
        ["a cat", "a blue fish swims"], timesteps=[1000, 500], output_type="latent", **SMALL
    )
    assert out.frames is None and out.latents.shape == (2, 16, 2, 4, 6)
    assert out.timesteps == [1000.0, 500.0] and out.prompts == ["a cat", "a blue fish swims"]
    with pytest.raises(ValueError, match="no frames"):
        _ = out.video


def test_any_resolution_vsa_matches_the_reference_backend(fast_gen):
    # 48 x 80 pixels -> latent 6 x 10 -> token grid (2, 3, 5): no dimension divides 4.
    kw = dict(height=48, width=80, num_frames=5, seed=3, max_sequence_length=16)
    fast_gen.set_attention("vsa", sparsity=0.5, backend="torch")
    fast = fast_gen.generate("a bird flies in the sky", output_type="latent", **kw)
    fast_gen.set_attention("vsa", sparsity=0.5, backend="reference")
    ref = fast_gen.generate("a bird flies in the sky", output_type="latent", **kw)
    fast_gen.set_attention("vsa", sparsity=0.8)
    torch.testing.assert_close(fast.latents, ref.latents, rtol=1e-4, atol=1e-4)


def test_vsa_at_sparsity_zero_with_untrained_gates_matches_dense(wan21):
    kw = dict(timesteps=[1000, 757, 522], seed=4, output_type="latent", **SMALL)
    dense = VideoGenerator.from_pretrained(wan21, preset="wan2.1-t2v-1.3b", device="cpu")
    vsa = VideoGenerator.from_pretrained(
        wan21, preset="wan2.1-t2v-1.3b", attention="vsa", sparsity=0.0, device="cpu"
    )
    a = dense.generate("a green tree", **kw).latents
    b = vsa.generate("a green tree", **kw).latents
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_euler_and_unipc_samplers(fast_gen):
    euler = fast_gen.generate("a car", sampler="euler", num_inference_steps=4, seed=0, **SMALL)
    assert euler.sampler == "euler" and len(euler.timesteps) == 4
    assert euler.timesteps[0] == 1000.0  # shift 8: 1000, then noisier than linear
    assert euler.timesteps[1] > 750.0
    unipc = fast_gen.generate("a car", sampler="unipc", num_inference_steps=2, seed=0, **SMALL)
    assert unipc.sampler == "unipc" and len(unipc.timesteps) == 2


def test_bad_sizes_propose_the_nearest_valid_ones(fast_gen, wan22):
    with pytest.raises(ValueError, match=r"height=40 is not a multiple of 16.*32 or 48"):
        fast_gen.generate("a cat", height=40, width=48, num_frames=5)
    with pytest.raises(ValueError, match=r"width=50 .*48 or 64"):
        fast_gen.generate("a cat", height=32, width=50, num_frames=5)
    with pytest.raises(ValueError, match=r"num_frames=6 must be 1 \+ a multiple of 4.*5 or 9"):
        fast_gen.generate("a cat", height=32, width=48, num_frames=6)
    for field, value in (("num_frames", 0), ("height", -16)):
        with pytest.raises(ValueError, match=f"{field} must be a positive int"):
            fast_gen.generate("a cat", **{**SMALL, field: value})
    five = VideoGenerator.from_pretrained(wan22, preset="wan2.2-ti2v-5b", device="cpu")
    with pytest.raises(ValueError, match=r"height=48 is not a multiple of 32 \(VAE x16"):
        five.generate("a cat", height=48, width=64, num_frames=5)


def test_bad_generation_arguments_raise_value_errors(fast_gen):
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        fast_gen.generate("a cat", num_inference_steps=0, **SMALL)
    with pytest.raises(ValueError, match="not both"):
        fast_gen.generate("a cat", num_inference_steps=3, timesteps=[1000], **SMALL)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fast_gen.generate("a cat", timesteps=[500, 1000], **SMALL)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        fast_gen.generate("  ", **SMALL)
    with pytest.raises(ValueError, match="pass seed="):
        fast_gen.generate("a cat", seed=None, **SMALL)
    with pytest.raises(ValueError, match="sampler must be one of"):
        fast_gen.generate("a cat", sampler="ddim", **SMALL)
    with pytest.raises(ValueError, match="negative_prompt has 2 entries for 1 prompts"):
        fast_gen.generate("a cat", ["x", "y"], guidance_scale=3.0, **SMALL)
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("fp8")


def test_compiled_blocks_match_eager_and_keep_the_state_dict(fastwan21, fast_gen):
    """Regional compilation (aot_eager: Dynamo + AOTAutograd tracing, the VSA custom op's
    fake implementation) gives the eager latents; the state dict keeps its keys."""
    kw = dict(seed=6, output_type="latent", **SMALL)
    eager = fast_gen.generate("a dog jumps over the ball", **kw).latents
    gen = VideoGenerator.from_pretrained(
        fastwan21, preset="fastwan2.1-t2v-1.3b", device="cpu", compile="aot_eager"
    )
    assert gen.compile_backend == "aot_eager"
    assert all(
        hasattr(b, "_compiled_call_impl") and b._compiled_call_impl for b in gen.transformer.blocks
    )
    assert set(gen.transformer.state_dict()) == set(fast_gen.transformer.state_dict())
    torch.testing.assert_close(gen.generate("a dog jumps over the ball", **kw).latents, eager)
    with pytest.raises(ValueError, match="compile must be True/False or one of"):
        VideoGenerator.from_pretrained(fastwan21, preset="fastwan2.1-t2v-1.3b", compile="tvm")
    with pytest.raises(ValueError, match="non-empty .blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_compiled_blocks_share_one_graph_per_attention_setting():
    """No graph break (each would add a frame) in dense or VSA blocks at an odd grid; each
    attention setting compiles once and every block reuses it, switching back included."""
    from torch._dynamo.testing import CompileCounter

    from fastwan.models import set_attention

    model = tiny_transformer().eval()
    counter = CompileCounter()
    assert compile_blocks(model, backend=counter) == len(model.blocks) == 2
    x = torch.randn(1, 16, 3, 10, 14)  # token grid (3, 5, 7): partial VSA tiles
    ctx, t = torch.randn(1, 16, model.config.text_dim), torch.full((1,), 500.0)
    for _ in range(2):
        for mode, sparsity in (("dense", None), ("vsa", 0.5), ("vsa", 0.8)):
            set_attention(model, mode, sparsity=sparsity, tile_size=(2, 2, 2))
            with torch.no_grad():
                model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
    assert counter.frame_count == 3


def test_vae_tiling_decodes_in_tiles(wan21):
    """Above the VAE's tile size (256 px) tiled decoding blends overlapping tiles: close to
    the whole-frame decode, not identical to it."""
    gen = VideoGenerator.from_pretrained(wan21, preset="wan2.1-t2v-1.3b", device="cpu")
    z = torch.randn(1, 16, 2, 40, 40, generator=torch.Generator().manual_seed(0))  # 320 px
    whole = gen.decode(z)
    tiled_gen = VideoGenerator(gen.components, device="cpu", vae_tiling=True)
    assert gen.components.vae.use_tiling
    tiled = tiled_gen.decode(z)
    gen.components.vae.disable_tiling()
    assert tiled.shape == whole.shape == (1, 5, 320, 320, 3)
    diff = np.abs(tiled - whole)
    assert diff.max() > 1e-3  # the tiled path ran
    assert diff.mean() < 0.1 * whole.std()  # and blends its seams
    with pytest.raises(ValueError, match="vae_tiling must be True or False"):
        VideoGenerator(gen.components, device="cpu", vae_tiling="yes")


def test_an_unknown_preset_name_is_an_error(wan21):
    with pytest.raises(ValueError, match="unknown preset"):
        VideoGenerator.from_pretrained(wan21, preset="wan3", device="cpu")


@pytest.mark.parametrize("backend", ["imageio-ffmpeg", "pyav"])
def test_save_video_mp4_round_trip(tmp_path, backend):
    if backend == "pyav":
        pytest.importorskip("av", reason="PyAV is the optional second MP4 writer")
    ramp = np.linspace(0, 1, 48, dtype=np.float32)[None, None, :, None]
    frames = (
        np.tile(ramp, (9, 32, 1, 3)) * np.linspace(0.2, 1, 9, dtype=np.float32)[:, None, None, None]
    )
    path = save_video(frames, tmp_path / "v.mp4", fps=12, backend=backend)
    decoded, fps = read_video(path)
    assert decoded.shape == (9, 32, 48, 3) and fps == 12
    assert np.abs(decoded / 255.0 - frames).max() < 0.05  # lossy, but the same picture


def test_save_video_gif_and_errors(tmp_path):
    frames = (np.arange(5)[:, None, None, None] * 40 + np.zeros((5, 16, 24, 3))).astype(np.uint8)
    decoded, fps = read_video(save_video(torch.from_numpy(frames), tmp_path / "v.gif", fps=10))
    assert decoded.shape == (5, 16, 24, 3) and fps == pytest.approx(10)
    assert np.abs(decoded.astype(int) - frames).max() <= 2
    with pytest.raises(ValueError, match="must end in one of"):
        save_video(frames, tmp_path / "v.avi")
    with pytest.raises(ValueError, match="save one at a time"):
        save_video(np.stack([frames, frames]), tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="fps must be a positive number"):
        save_video(frames, tmp_path / "v.mp4", fps=0)
    with pytest.raises(ValueError, match=r"frames must be \[F, H, W, 3\]"):
        save_video(np.zeros((2, 3)), tmp_path / "v.mp4")
