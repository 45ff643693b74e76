"""Validation videos, the recipe's negative prompt and Wan2.2 per-token timesteps in training.

A tiny Wan folder (1 layer) and a tiny parquet set: latents ``[16, 2, 8, 8]`` = 5 frames of
64 x 64 pixels; the student runs VSA with tile (1, 2, 2) at sparsity 0.5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny_wan import TEXT_DIM, build_tiny_wan, tiny_transformer, write_random_video_shard
from PIL import Image

from fastwan.config import (
    WAN_NEGATIVE_PROMPT,
    ConfigError,
    DMDConfig,
    VSAConfig,
    recipe_from_dict,
)
from fastwan.methods.dmd import DMDMethod
from fastwan.methods.flow import FlowMethod
from fastwan.train.validation import (
    Validator,
    grid_frame_indices,
    load_validation_vae,
    make_grid,
)
from fastwan.video_io import read_video

LATENT = (16, 2, 8, 8)  # 5 frames x 64 x 64 pixels
PROMPTS = ["a red cat runs", "a blue dog jumps"]
SEEDS = [1, 2]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan"), num_layers=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_random_video_shard(tmp_path_factory.mktemp("data"), latent=LATENT)


def _recipe(out, wan_dir, data_dir, *, method="dmd", train=None, dmd=None):
    return recipe_from_dict(
        {
            "model": {"teacher": str(wan_dir), "dtype": "fp32", "teacher_dtype": "fp32"},
            "train": {
                "method": method,
                "max_steps": 3,
                "mixed_precision": "fp32",
                "seed": 3,
                "log_interval": 1,
                "checkpoint_interval": 0,
                "output_dir": str(out),
                "validation_prompts": PROMPTS,
                "validation_seeds": SEEDS,
                "validation_interval": 2,
                "report_to": ["tensorboard"],
                **(train or {}),
            },
            "data": {
                "path": str(data_dir),
                "num_workers": 0,
                "text_length": 16,
                "num_frames": 5,
                "height": 64,
                "width": 64,
            },
            "optim": {"generator": {"lr": 1e-2}, "critic": {"lr": 1e-3}},
            "dmd": {
                "generator_update_interval": 1,
                "guidance_scale": 3.0,
                "negative_prompt": "low quality static",
                **(dmd or {}),
            },
            "vsa": {"sparsity": 0.5, "tile_size": [1, 2, 2], "backend": "torch"},
        }
    )


def _build_on(recipe, device):
    from fastwan.train.build import build_trainer

    return build_trainer(recipe, device=device, log_fn=lambda _line: None).trainer


def _build(recipe):
    return _build_on(recipe, "cpu")


def _params(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def test_dmd_validation_files_grid_ema_and_seeds(tmp_path, wan_dir, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    recipe = _recipe(out, wan_dir, data_dir, train={"ema_decay": 0.5})
    trainer = _build(recipe)
    assert trainer.validator.sampler == "dmd"
    assert trainer.validator.timesteps == [1000, 757, 522]
    trainer.train()  # steps 1..3: validation at step 2 (interval) and 3 (the end)

    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2", "step-3"]
    step3 = out / "validation" / "step-3"
    mp4s, gifs = sorted(step3.glob("*.mp4")), sorted(step3.glob("*.gif"))
    assert len(mp4s) == len(gifs) == len(PROMPTS) * len(SEEDS)
    frames, fps = read_video(mp4s[0])
    assert frames.shape == (5, 64, 64, 3) and fps == 16.0
    gif_frames, _ = read_video(gifs[0])
    assert gif_frames.shape == (5, 64, 64, 3)
    # rows: prompts, columns: seeds; each cell 4 of the 5 frames, 2-pixel gaps
    with Image.open(step3 / "grid.png") as grid:
        assert grid.size == (2 * 4 * 64 + 2, 2 * 64 + 2)
    index = json.loads((step3 / "index.json").read_text())
    assert [(v["prompt"], v["seed"]) for v in index["videos"]] == [
        (p, s) for p in PROMPTS for s in SEEDS
    ]
    assert (out / "loss_curves.png").is_file()

    # TensorBoard: every step's metrics and the validation grids
    acc = EventAccumulator(str(out / "logs"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/critic_loss",
        "train/generator_loss",
        "train/critic_grad_norm",
        "train/generator_grad_norm",
        "train/critic_lr",
        "train/generator_lr",
        "train/critic_timestep",
        "train/generator_rollout_timestep",
        "train/sparsity",
        "train/step_time",
        "train/samples_per_s",
        "validation/seconds",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert [e.step for e in acc.Scalars("train/critic_loss")] == [1, 2, 3]
    losses = [e.value for e in acc.Scalars("train/critic_loss")]
    assert losses == pytest.approx([r["critic_loss"] for r in trainer.history], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/sparsity")] == [0.5, 0.5, 0.5]  # exact in fp32
    assert [e.step for e in acc.Images("validation/grid")] == [2, 3]

    # The validator uses the EMA weights and leaves the live weights and the RNG alone.
    net, validator = trainer.networks["generator"], trainer.validator
    live, rng = _params(net), trainer.rng.get_state()
    result = trainer.validate()
    # exact: untouched weights and RNG state (the EMA swap copies the live weights back)
    assert all(torch.equal(v, live[k]) for k, v in _params(net).items())
    assert torch.equal(trainer.rng.get_state(), rng)
    assert net.training  # back in training mode
    live_latents, _ = validator.generate(net)
    with trainer.ema.swapped_in(net):
        ema_latents, ema_frames = validator.generate(net)
    # exact: Validator.generate both times, the same EMA weights, seeds and batch of one,
    # in this process: the same ops in the same order
    assert torch.equal(result.latents, ema_latents)  # same seeds -> the same videos
    assert np.array_equal(result.frames, ema_frames)
    assert not torch.allclose(result.latents, live_latents)  # the EMA differs from live
    # the written MP4 is the decoded video of (prompt 0, seed 1), up to H.264 loss
    decoded, _ = read_video(result.videos[(0, SEEDS[0])])
    assert np.abs(decoded.astype(float) - result.frames[0].astype(float)).mean() < 12
    # different seeds and prompts give different videos
    lat = result.latents  # [P * S, C, T, h, w]
    assert lat.shape == (len(PROMPTS) * len(SEEDS), *LATENT)
    assert not torch.equal(lat[0], lat[1]) and not torch.equal(lat[0], lat[2])


@pytest.mark.gpu
def test_validation_on_gpu_under_bf16_autocast(tmp_path, wan_dir, data_dir):
    train = {"mixed_precision": "bf16", "max_steps": 2, "report_to": []}
    trainer = _build_on(_recipe(tmp_path / "run", wan_dir, data_dir, train=train), "cuda")
    assert trainer.validator.autocast_dtype == torch.bfloat16
    trainer.train()  # validates at step 2 (the interval and the end)
    assert len(list((tmp_path / "run" / "validation" / "step-2").glob("*.mp4"))) == 4
    first, again = trainer.validate(), trainer.validate()
    assert first.frames.shape == (len(PROMPTS) * len(SEEDS), 5, 64, 64, 3)
    torch.testing.assert_close(first.latents, again.latents, rtol=1e-3, atol=1e-3)


def test_flow_validation_multistep_cfg(tmp_path, wan_dir, data_dir):
    train = {
        "validation_sampler": "scheduler",  # the folder's own (UniPC), read at build
        "validation_steps": 2,
        "validation_guidance_scale": 2.0,
        "validation_interval": 0,  # only at the end
        "validation_seeds": [5],
        "report_to": [],
    }
    recipe = _recipe(tmp_path / "run", wan_dir, data_dir, method="flow", train=train)
    recipe.train.max_steps = 1
    trainer = _build(recipe)
    v = trainer.validator
    assert v.sampler == "scheduler" and v.num_inference_steps == 2 and v.uncond is not None
    assert type(v.scheduler).__name__ == "UniPCMultistepScheduler"
    seen = []
    net = trainer.networks["generator"]
    hook = net.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True
    )
    trainer.train()
    hook.remove()
    step1 = tmp_path / "run" / "validation" / "step-1"
    assert len(list(step1.glob("*.mp4"))) == len(PROMPTS)
    # training (1 micro-batch) + 2 prompts x 2 steps x (cond, uncond)
    assert len(seen) == 1 + 2 * 2 * 2
    assert torch.equal(seen[-1], v.uncond)  # the negative prompt is the CFG's uncond (a copy)
    with Image.open(step1 / "grid.png") as grid:
        assert grid.size == (4 * 64, 2 * 64 + 2)
    # CFG matters: w = 1 gives another video (here with the Euler sampler)
    v.sampler = "euler"
    guided, _ = v.generate(net)
    v.guidance_scale = 1.0
    plain, _ = v.generate(net)
    assert not torch.allclose(guided, plain)


def test_recipe_negative_prompt_reaches_the_teacher(tmp_path, wan_dir, data_dir):
    from fastwan.data.encoders import WanTextEncoder

    encoder = WanTextEncoder.from_pretrained(
        wan_dir, device="cpu", dtype=torch.float32, max_length=16
    )
    for negative in ("low quality static", ""):
        recipe = _recipe(
            tmp_path / "run",
            wan_dir,
            data_dir,
            train={"validation_prompts": [], "report_to": []},
            dmd={"negative_prompt": negative},
        )
        trainer = _build(recipe)
        assert trainer.validator is None
        expected = encoder([negative])[0]  # [L, dim]
        # exact: the build encodes this one prompt alone too (no validation prompts, no
        # empty prompt: a batch of one), with the same float32 CPU encoder, in this process
        torch.testing.assert_close(trainer.method.negative[0], expected, rtol=0, atol=0)
    other = encoder(["low quality static"])[0]
    assert other.shape != expected.shape or not torch.equal(other, expected)
    # the default is Wan's negative prompt, kept equal to the preset's
    from fastwan.models.presets import WAN_NEGATIVE_PROMPT as PRESET_NEGATIVE

    assert DMDConfig().negative_prompt == WAN_NEGATIVE_PROMPT == PRESET_NEGATIVE


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "validation_steps", 0),
        ("train", "validation_guidance_scale", 0.0),
        ("train", "validation_sampler", "ddim"),
        ("train", "validation_fps", 0),
        ("train", "validation_grid_frames", 0),
        ("train", "validation_prompts", ["a cat", " "]),
        ("train", "report_to", ["mlflow"]),
        ("train", "report_to", ["tensorboard", "tensorboard"]),
        ("train", "tracker_project", ""),
        ("dmd", "negative_prompt", 3),
    ],
)
def test_invalid_new_fields_name_the_field(tmp_path, wan_dir, data_dir, section, key, value):
    good = _recipe(tmp_path, wan_dir, data_dir)
    from fastwan.config import recipe_to_dict

    data = recipe_to_dict(good)
    data[section][key] = value
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}"):
        recipe_from_dict(data)


def test_grid_layout():
    def video(value, frames=5):
        v = np.zeros((frames, 4, 6, 3), np.uint8)
        v[:] = np.arange(frames, dtype=np.uint8)[:, None, None, None] + value
        return v

    rows = [[video(0), video(10), video(20)], [video(30), video(40), video(50)]]
    grid = make_grid(rows, frames_per_video=3, pad=2)
    assert grid.shape == (2 * 4 + 2, 3 * 3 * 6 + 2 * 2, 3)
    assert grid_frame_indices(5, 3) == [0, 2, 4] and grid_frame_indices(2, 4) == [0, 1]
    # row 1, column 2, frame 4: value 50 + 4 at y = 6.., x = 2 * (18 + 2) + 2 * 6
    assert (grid[6:10, 52:58] == 54).all()
    assert (grid[4:6] == 255).all()  # the gap between rows
    with pytest.raises(ValueError, match="rectangular"):
        make_grid([[video(0)], []])


def test_validator_rejects_bad_setups(wan_dir):
    vae = load_validation_vae(wan_dir, "cpu")
    emb = [torch.zeros(3, TEXT_DIM)]
    kw = dict(seeds=[0], latent_shape=LATENT, text_length=16)
    with pytest.raises(ValueError, match="one embedding per prompt"):
        Validator(vae, ["a", "b"], emb, **kw)
    with pytest.raises(ValueError, match="timesteps"):
        Validator(vae, ["a"], emb, sampler="dmd", **kw)
    with pytest.raises(ValueError, match="negative"):
        Validator(vae, ["a"], emb, sampler="euler", num_inference_steps=2, guidance_scale=3, **kw)
    with pytest.raises(ValueError, match="scheduler"):
        Validator(vae, ["a"], emb, sampler="unipc", num_inference_steps=2, **kw)


# ----------------------------------------------------------------------- Wan2.2 timesteps

LATENT22 = (48, 2, 4, 4)  # token grid (2, 2, 2): 8 tokens


def _record_timesteps(net, store):
    return net.register_forward_pre_hook(
        lambda _m, _a, kw: store.append(kw["timestep"].clone()), with_kwargs=True
    )


def _batch22(b=2):
    g = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(b, *LATENT22, generator=g),
        "text_embedding": torch.randn(b, 16, TEXT_DIM, generator=g),
    }


def test_wan22_methods_pass_per_token_timesteps():
    torch.manual_seed(0)
    teacher = tiny_transformer("wan2.2", num_layers=1)
    vsa = VSAConfig(sparsity=0.5, tile_size=(1, 2, 2), backend="torch")
    dmd = DMDConfig(guidance_scale=3.0, rollout="simulate")
    negative = torch.randn(16, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    per_token = DMDMethod(teacher, dmd, vsa, negative, expand_timesteps=True)
    scalar = DMDMethod(per_token.teacher, dmd, vsa, negative, student=per_token.student,
                       critic=per_token.critic)  # fmt: skip
    batch = _batch22()
    for step, roles in (
        ("generator_step", ("student", "teacher", "critic")),
        ("critic_step", ("student", "critic")),
    ):
        seen = {r: [] for r in ("student", "teacher", "critic")}
        hooks = [_record_timesteps(getattr(per_token, r), s) for r, s in seen.items()]
        loss, info = getattr(per_token, step)(batch, torch.Generator().manual_seed(4))
        for h in hooks:
            h.remove()
        assert [r for r in seen if seen[r]] == list(roles)  # the networks the step calls
        for role in roles:
            assert seen[role], (step, role)
            for t in seen[role]:
                assert t.shape == (2, 8), (step, role, t.shape)  # [B, tokens]
                assert torch.equal(t, t[:, :1].expand(-1, 8))  # one value per sample (copies)
        if step == "generator_step":
            # the teacher runs cond and uncond (CFG) at the same per-sample timestep
            assert len(seen["teacher"]) == 2 and torch.equal(*seen["teacher"])  # one tensor
            assert info["timestep"] == pytest.approx(float(seen["teacher"][0][:, 0].mean()))
        # Wan2.2's per-token call with one value per sample equals the scalar call
        ref, _ = getattr(scalar, step)(batch, torch.Generator().manual_seed(4))
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    # the student's rollout timestep reaches it per token too
    assert seen["student"][-1][0, 0] == info["rollout_timestep"]  # exact: an integer timestep

    flow = FlowMethod(per_token.critic, VSAConfig(enabled=False), expand_timesteps=True)
    ts = []
    hook = _record_timesteps(flow.model, ts)
    loss, info = flow.loss("generator", batch, torch.Generator().manual_seed(2))
    hook.remove()
    assert ts[0].shape == (2, 8) and float(ts[0].mean()) == pytest.approx(info["timestep"])
    ref, _ = FlowMethod(flow.model, VSAConfig(enabled=False)).loss(
        "generator", batch, torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)


def test_wan22_validation_equals_video_generator(tmp_path, wan_dir):
    """On a Wan2.2 folder: build detects per-token timesteps; a validation video is the
    VideoGenerator's video of the same prompt, seed and timesteps (the shared sampler)."""
    from fastwan.pipeline import VideoGenerator
    from fastwan.train.build import expand_timesteps_of

    wan22 = build_tiny_wan(tmp_path / "wan22", variant="wan2.2", num_layers=1)
    assert expand_timesteps_of(wan22) is True
    assert expand_timesteps_of(wan_dir) is False

    gen = VideoGenerator.from_pretrained(
        wan22, preset="wan2.2-ti2v-5b", attention="dense", device="cpu"
    )
    prompt, seed, steps = "a small bird flies", 7, [1000, 600]
    ref = gen.generate(prompt, height=64, width=64, num_frames=5, timesteps=steps, seed=seed,
                       guidance_scale=1.0, max_sequence_length=16)  # fmt: skip
    emb = gen.encode_prompt([prompt], 16)[0]  # [L, dim]
    validator = Validator(
        load_validation_vae(wan22, "cpu"),
        [prompt],
        [emb],
        seeds=[seed],
        latent_shape=LATENT22,
        text_length=16,
        timesteps=steps,
        expand_timesteps=True,
        grid_frames=2,
    )
    ts = []
    hook = _record_timesteps(gen.transformer, ts)
    result = validator.run(gen.transformer, 0, tmp_path / "run")
    hook.remove()
    assert [tuple(t.shape) for t in ts] == [(1, 8), (1, 8)]  # per token, one per step
    # exact: both run fastwan.pipeline.denoise on the same transformer, noise (CPU
    # generator, same seed), embedding and timesteps, batch of one, in this process (the
    # same ops in the same order); then decode_latents with the folder's float32 VAE
    torch.testing.assert_close(result.latents, ref.latents, rtol=0, atol=0)
    assert np.array_equal(result.frames[0], (ref.video * 255).round().astype(np.uint8))
    with Image.open(result.grid_path) as grid:
        assert grid.size == (2 * 64, 64)
