"""Image-to-video and diffusers' ``__call__`` conventions of VideoGenerator.generate, against
diffusers' own WanImageToVideoPipeline / WanPipeline on tiny folders diffusers saved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_wan import build_tiny_wan, build_tiny_wan_i2v
from PIL import Image

from fastwan.pipeline import VideoGenerator

COMMON = dict(
    prompt="a red cat runs on the road",
    negative_prompt="blurry, low quality",
    num_frames=5,
    num_inference_steps=3,
    guidance_scale=5.0,
    max_sequence_length=16,
)


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth colours plus noise: a picture the VAE and CLIP see as more than a flat field
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 0.5 + 0.0 * xx], -1) * 200
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def wan21_i2v(tmp_path_factory):
    return build_tiny_wan_i2v(tmp_path_factory.mktemp("wan21_i2v"))


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan22"), variant="wan2.2")


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan21"))


@pytest.fixture(scope="module")
def i2v_gen(wan21_i2v):
    return VideoGenerator.from_pretrained(wan21_i2v, attention="dense", device="cpu")


@pytest.fixture(scope="module")
def ti2v_gen(wan22):
    return VideoGenerator.from_pretrained(
        wan22, preset="wan2.2-ti2v-5b", attention="dense", device="cpu"
    )


def _diffusers_i2v(path, **kw):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    seed = kw.pop("seed")
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames


@pytest.fixture(scope="module")
def flf2v(tmp_path_factory):
    return build_tiny_wan_i2v(tmp_path_factory.mktemp("flf2v"), flf2v=True)


@pytest.mark.parametrize("last", [False, True])
def test_wan21_i2v_equals_diffusers(request, i2v_gen, last):
    """CLIP embeddings into the image cross-attention, mask + condition latents as 20 more
    input channels; with a last frame (a first-last-frame model) both images condition."""
    path = request.getfixturevalue("flf2v" if last else "wan21_i2v")
    gen = VideoGenerator.from_pretrained(path, attention="dense", device="cpu") if last else i2v_gen
    assert gen.task == "i2v" and gen.transformer.config.in_channels == 36
    size = dict(height=32, width=48)
    kw = dict(COMMON, image=_image(32, 48, 0), seed=3, **size)
    if last:
        with pytest.raises(ValueError, match="last_image: .*FLF2V.*pass last_image"):
            gen.generate(**kw)  # a first-last-frame model without its last frame
        kw["last_image"] = _image(32, 48, 1)
    ref = _diffusers_i2v(path, **kw)
    out = gen.generate(flow_shift=3.0, **kw)
    assert out.frames.shape == ref.shape == (1, 5, 32, 48, 3)
    np.testing.assert_allclose(out.frames, ref, rtol=0, atol=1e-5)
    assert "image_encode" in out.timings and out.latents.shape[1] == 16


def test_wan22_ti2v_equals_diffusers_and_keeps_the_first_frame(wan22, ti2v_gen):
    kw = dict(COMMON, image=_image(64, 96, 2), seed=5, height=64, width=96)
    ref = _diffusers_i2v(wan22, **kw)
    out = ti2v_gen.generate(flow_shift=3.0, **kw)
    np.testing.assert_allclose(out.frames, ref, rtol=0, atol=1e-5)
    # the first latent frame is the image's own latent, at every sampler
    cond = ti2v_gen.prepare_image_condition(
        kw["image"], batch=1, height=64, width=96, num_frames=5
    ).latent
    for extra in (dict(sampler="euler", num_inference_steps=2), dict(timesteps=[1000, 757])):
        kw2 = {k: v for k, v in kw.items() if k != "num_inference_steps"}
        res = ti2v_gen.generate(output_type="latent", **{**kw2, **extra})
        torch.testing.assert_close(res.latents[:, :, :1], cond.float(), rtol=0, atol=0)
        assert res.latents[:, :, 1:].abs().sum() > 0


def test_ti2v_text_only_still_works_and_differs_from_image(ti2v_gen):
    kw = dict(COMMON, seed=5, height=64, width=96, output_type="latent")
    text = ti2v_gen.generate(**kw)
    img = ti2v_gen.generate(image=_image(64, 96, 2), **kw)
    assert not torch.allclose(text.latents, img.latents)


def test_i2v_vsa_at_sparsity_zero_equals_dense(wan21_i2v, i2v_gen):
    vsa = VideoGenerator.from_pretrained(wan21_i2v, attention="vsa", sparsity=0.0, device="cpu")
    kw = dict(COMMON, image=_image(32, 48, 0), seed=3, height=32, width=48, output_type="latent")
    torch.testing.assert_close(
        vsa.generate(**kw).latents, i2v_gen.generate(**kw).latents, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("kind", ["ti2v", "i2v", "flf2v"])
def test_a_list_of_images_batches_what_one_call_per_image_gives(request, kind):
    """image=[one per prompt] (x num_videos_per_prompt) in one call equals each image in its
    own call from the same initial noise: every video keeps its own first frame."""
    if kind == "ti2v":
        gen, h, w = request.getfixturevalue("ti2v_gen"), 64, 96
    elif kind == "i2v":
        gen, h, w = request.getfixturevalue("i2v_gen"), 32, 48
    else:
        folder = request.getfixturevalue("flf2v")
        gen, h, w = VideoGenerator.from_pretrained(folder, attention="dense", device="cpu"), 32, 48
    prompts = ["a red cat runs on the road", "a blue bird flies over the sea"]
    images = [_image(h, w, 10), _image(h, w, 11)]
    lasts = [_image(h, w, 12), _image(h, w, 13)] if kind == "flf2v" else None
    kw = {k: v for k, v in COMMON.items() if k != "prompt"}
    kw.update(height=h, width=w, output_type="latent", num_inference_steps=2)
    n = 2  # videos per prompt
    noise = torch.randn(
        gen.latent_shape(len(prompts) * n, h, w, 5), generator=torch.Generator().manual_seed(1)
    )
    batched = gen.generate(
        prompts, image=images, last_image=lasts, num_videos_per_prompt=n, latents=noise, **kw
    ).latents
    for i, prompt in enumerate(prompts):
        one = gen.generate(
            prompt,
            image=images[i],
            last_image=lasts[i] if lasts else None,
            num_videos_per_prompt=n,
            latents=noise[i * n : (i + 1) * n],
            **kw,
        ).latents
        torch.testing.assert_close(batched[i * n : (i + 1) * n], one, rtol=1e-4, atol=1e-4)
    # the two images do condition differently
    assert (batched[0] - batched[n]).abs().max() > 1e-3


def test_listed_images_are_checked(ti2v_gen, flf2v):
    kw = dict(COMMON, height=64, width=96, num_inference_steps=1, output_type="latent")
    kw.pop("prompt")
    with pytest.raises(ValueError, match="a list of 3 images for 2 prompt"):
        ti2v_gen.generate(["a", "b"], image=[_image(64, 96, i) for i in range(3)], **kw)
    gen = VideoGenerator.from_pretrained(flf2v, attention="dense", device="cpu")
    with pytest.raises(ValueError, match="last_image: a list of last frames needs a list"):
        gen.generate("a", image=_image(32, 48, 0), last_image=[_image(32, 48, 1)])
    with pytest.raises(ValueError, match="last_image: with a list of images, pass a list of 2"):
        gen.generate(["a", "b"], image=[_image(32, 48, 0)] * 2, last_image=_image(32, 48, 1))
    with pytest.raises(ValueError, match=r"image\[1\]"):
        ti2v_gen.generate(["a", "b"], image=[_image(64, 96, 0), 7], **kw)
    kw.pop("height"), kw.pop("width")
    with pytest.raises(ValueError, match="different sizes .*pass height and width"):
        ti2v_gen.generate(["a", "b"], image=[_image(64, 96, 0), _image(96, 64, 1)], **kw)


def test_default_size_follows_the_image_aspect(i2v_gen, ti2v_gen):
    # the preset's area (480 x 832 for an unmatched Wan2.1 folder) at the image's aspect
    h, w = i2v_gen.default_size_for_image(_image(90, 160, 0))
    assert h % 16 == 0 and w % 16 == 0 and abs(w / h - 16 / 9) < 0.05
    p = i2v_gen.preset
    assert abs(h * w - p.height * p.width) / (p.height * p.width) < 0.1
    h2, w2 = ti2v_gen.default_size_for_image(_image(160, 90, 0))  # portrait
    assert h2 % 32 == 0 and w2 % 32 == 0 and h2 > w2


def test_image_arguments_are_checked(i2v_gen, ti2v_gen, wan21, tmp_path):
    t2v = VideoGenerator.from_pretrained(wan21, attention="dense", device="cpu")
    small = dict(height=32, width=48, num_frames=5, max_sequence_length=16)
    with pytest.raises(ValueError, match="text-to-video model"):
        t2v.generate("a cat", image=_image(32, 48, 0), **small)
    with pytest.raises(ValueError, match="image-to-video model: pass image="):
        i2v_gen.generate("a cat", **small)
    with pytest.raises(ValueError, match="last_image: .*first-last-frame"):
        i2v_gen.generate("a cat", image=_image(32, 48, 0), last_image=_image(32, 48, 1), **small)
    with pytest.raises(ValueError, match="last_image: .*first frame only"):
        ti2v_gen.generate("a cat", image=_image(64, 96, 0), last_image=_image(64, 96, 1))
    with pytest.raises(ValueError, match="is not a file"):
        i2v_gen.generate("a cat", image=str(tmp_path / "missing.png"), **small)
    with pytest.raises(ValueError, match=r"image must be \[H, W, 3\]"):
        i2v_gen.generate("a cat", image=np.zeros((4, 4)), **small)
    with pytest.raises(ValueError, match="pass both height and width"):
        i2v_gen.generate("a cat", image=_image(32, 48, 0), height=32, num_frames=5)
    with pytest.raises(ValueError, match="height=40 is not a multiple of 16"):
        i2v_gen.generate("a cat", image=_image(32, 48, 0), height=40, width=48, num_frames=5)
    path = tmp_path / "first.png"
    _image(32, 48, 0).save(path)  # a file path and an array are the same image
    a = i2v_gen.generate("a cat", image=path, seed=1, output_type="latent", **small)
    b = i2v_gen.generate(
        "a cat", image=np.asarray(Image.open(path)), seed=1, output_type="latent", **small
    )
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)


# ----------------------------------------------------------------- diffusers' conventions


def _diffusers_t2v(path, **kw):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    seed = kw.pop("seed")
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames


@pytest.fixture(scope="module")
def t2v_gen(wan21):
    return VideoGenerator.from_pretrained(wan21, attention="dense", device="cpu")


def test_num_videos_per_prompt_and_step_end_callback_equal_diffusers(wan21, t2v_gen):
    def halve_at_step_one(pipe, i, t, tensors):
        # diffusers' contract: return the tensors to replace
        return {"latents": tensors["latents"] * 0.5} if i == 1 else {}

    kw = dict(
        COMMON,
        prompt=["a red cat runs", "a blue fish swims"],
        negative_prompt=["blurry", "dark"],
        height=32,
        width=48,
        seed=7,
        num_videos_per_prompt=2,
        callback_on_step_end=halve_at_step_one,
    )
    ref = _diffusers_t2v(wan21, **kw)
    out = t2v_gen.generate(flow_shift=3.0, **kw)
    assert out.frames.shape == ref.shape == (4, 5, 32, 48, 3)
    np.testing.assert_allclose(out.frames, ref, rtol=0, atol=1e-5)
    assert out.prompts == ["a red cat runs"] * 2 + ["a blue fish swims"] * 2
    plain = t2v_gen.generate(flow_shift=3.0, **{**kw, "callback_on_step_end": None})
    assert not np.allclose(plain.frames, out.frames, atol=1e-3)  # the callback acted


def test_output_types_return_dict_latents_and_embeddings(t2v_gen):
    kw = dict(height=32, width=48, num_frames=5, max_sequence_length=16, seed=2)
    kw.update(num_inference_steps=2, guidance_scale=3.0)
    base = t2v_gen.generate("a green tree", **kw)
    pt = t2v_gen.generate("a green tree", output_type="pt", **kw).frames
    assert pt.shape == (1, 5, 3, 32, 48)
    torch.testing.assert_close(pt.permute(0, 1, 3, 4, 2).numpy(), base.frames, rtol=0, atol=0)
    pil = t2v_gen.generate("a green tree", output_type="pil", **kw).frames
    assert len(pil) == 1 and len(pil[0]) == 5 and pil[0][0].size == (48, 32)
    assert np.abs(np.asarray(pil[0][2]) / 255.0 - base.frames[0, 2]).max() <= 0.5 / 255 + 1e-6
    (frames,) = t2v_gen.generate("a green tree", return_dict=False, **kw)
    np.testing.assert_array_equal(frames, base.frames)
    # latents= is the initial noise: the seed's own noise gives the seed's video
    noise = torch.randn(base.latents.shape, generator=torch.Generator().manual_seed(2))
    other = {**kw, "seed": 99}
    given = t2v_gen.generate("a green tree", latents=noise, **other)
    np.testing.assert_array_equal(given.frames, base.frames)
    # prompt_embeds= / negative_prompt_embeds= stand for the text encoder
    pos = t2v_gen.encode_prompt(["a green tree"], 16)
    neg = t2v_gen.encode_prompt([t2v_gen.preset.negative_prompt], 16)
    emb = t2v_gen.generate(prompt_embeds=pos, negative_prompt_embeds=neg, **kw)
    np.testing.assert_array_equal(emb.frames, base.frames)
    with pytest.raises(ValueError, match="latents must be a tensor of shape"):
        t2v_gen.generate("a green tree", latents=noise[:, :, :1], **kw)
    with pytest.raises(ValueError, match="pass negative_prompt_embeds= too"):
        t2v_gen.generate(prompt_embeds=pos, **kw)
    with pytest.raises(ValueError, match="not both"):
        t2v_gen.generate("a green tree", prompt_embeds=pos, **kw)
    with pytest.raises(ValueError, match="num_videos_per_prompt must be an int >= 1"):
        t2v_gen.generate("a green tree", num_videos_per_prompt=0, **kw)
    with pytest.raises(ValueError, match="output_type must be one of"):
        t2v_gen.generate("a green tree", output_type="gif", **kw)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        t2v_gen.generate("a green tree", callback_on_step_end_tensor_inputs=["noise_pred"], **kw)


def test_generate_cli_takes_an_image(wan22, wan21, tmp_path, monkeypatch, capsys):
    import fastwan.cli as cli
    from fastwan.video_io import read_video

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["fastwan.commands.generate"])
    first = tmp_path / "first.png"
    _image(64, 96, 4).save(first)
    out = tmp_path / "i2v.mp4"
    base = ["generate", "--prompt", "a red cat runs", "--device", "cpu", "--no-progress"]
    base += ["--max-sequence-length", "16", "--num-frames", "5", "--steps", "2"]
    # the folder's own name matches no preset: the image's aspect at the default area
    # would be large, so the size is given; the aspect rule is tested above
    rc = cli.main([*base, "--model", str(wan22), "--image", str(first), "--output", str(out),
                   "--height", "64", "--width", "96"])  # fmt: skip
    assert rc == 0
    frames, _ = read_video(out)
    assert frames.shape == (5, 64, 96, 3)
    # the image conditions the video: another image, another video (same seed)
    other = tmp_path / "other.png"
    Image.fromarray(255 - np.asarray(Image.open(first))).save(other)
    out2 = tmp_path / "i2v_other.mp4"
    rc = cli.main([*base, "--model", str(wan22), "--image", str(other), "--output", str(out2),
                   "--height", "64", "--width", "96"])  # fmt: skip
    assert rc == 0
    assert np.abs(read_video(out2)[0].astype(float) - frames).mean() > 2.0
    # refused before any weight loads: an image for a text-to-video model, half a size
    rc = cli.main([*base, "--model", str(wan21), "--image", str(first)])
    assert rc != 0 and "text-to-video model" in capsys.readouterr().err
    rc = cli.main([*base, "--model", str(wan22), "--image", str(first), "--height", "64"])
    assert rc != 0 and "pass both --height and --width" in capsys.readouterr().err
    rc = cli.main([*base, "--model", str(wan22), "--image", str(tmp_path / "nope.png")])
    assert rc != 0 and "--image" in capsys.readouterr().err


def test_an_exported_i2v_model_keeps_its_image_side(wan21_i2v, i2v_gen, tmp_path):
    """fastwan export of a Wan2.1 I2V model: diffusers' WanImageToVideoPipeline loads it
    (CLIP encoder and processor included) and gives fastwan's video."""
    import json

    from fastwan.models.export import export_pipeline

    out = export_pipeline(wan21_i2v, i2v_gen.transformer, tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert (out / "image_encoder").is_dir() and (out / "image_processor").is_dir()
    kw = dict(COMMON, image=_image(32, 48, 0), seed=3, height=32, width=48)
    ref = _diffusers_i2v(out, **kw)
    again = VideoGenerator.from_pretrained(out, attention="dense", device="cpu")
    np.testing.assert_allclose(again.generate(flow_shift=3.0, **kw).frames, ref, atol=1e-5)
