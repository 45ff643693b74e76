"""The toy world's image-to-video side (fastwan/toy/i2v.py): the first frame says nothing
about the motion, and the measures read first-frame fidelity and motion exactly off real
clips, and catch what they are for (a static-frame collapse, another colour, a moved
object, the wrong direction)."""

from __future__ import annotations

import numpy as np
import pytest

from fastwan.toy import i2v, world

COMBOS = world.all_combos()  # 144: every shape x colour x direction x background


@pytest.fixture(scope="module")
def clips():
    seeds = list(range(len(COMBOS)))
    return i2v.render_i2v_batch(COMBOS, seeds), i2v.render_i2v_batch(
        COMBOS, [s + 1000 for s in seeds]
    )


def test_the_start_is_the_same_for_every_direction_and_deterministic():
    starts = {d: [] for d in world.DIRECTIONS}
    for seed in range(800):
        combo = world.Combo("square", "red", world.DIRECTIONS[seed % 4], "black")
        starts[combo.direction].append(i2v.i2v_start(seed))
    means = np.array([np.mean(v, axis=0) for v in starts.values()])  # [4, 2]
    lo, hi = i2v.START_BOX
    assert np.all(np.abs(means - (lo + hi) / 2) < 0.5)  # uniform over the box (sd ~0.12)
    assert i2v.i2v_start(3) == i2v.i2v_start(3) and i2v.i2v_start(3) != i2v.i2v_start(4)
    a = world.Combo("circle", "blue", "left", "grey")
    b = world.Combo("circle", "blue", "right", "grey")
    # the same seed, other directions: the same first frame, different clips
    ca, cb = i2v.render_i2v_clip(a, 9), i2v.render_i2v_clip(b, 9)
    assert np.array_equal(ca[0], cb[0]) and not np.array_equal(ca[-1], cb[-1])
    # the text-to-video world keeps its own start (its draws did not change)
    assert not np.array_equal(world.render_clip(a, 9)[0], ca[0])


def test_real_clips_score_perfectly(clips):
    gen, real = clips
    s = i2v.score_i2v(gen, COMBOS, gen[:, 0], real)
    assert s["first_frame_psnr"] == 100.0 and s["first_frame_attributes"] == 1.0
    assert s["direction_accuracy"] == 1.0
    assert abs(s["motion_ratio"] - 1.0) < 0.05  # other seeds: other speeds and starts
    assert 0.5 < s["motion_magnitude"] < 0.9  # ~0.8 px / frame, less when leaving the frame


def test_a_static_collapse_and_a_reversed_motion_are_caught(clips):
    gen, real = clips
    static = np.repeat(gen[:, :1], gen.shape[1], axis=1)  # the given frame, frozen
    s = i2v.score_i2v(static, COMBOS, gen[:, 0], real)
    assert s["first_frame_attributes"] == 1.0  # the frame is kept ...
    assert s["motion_ratio"] == 0.0  # ... but nothing moves
    reverse = {"left": "right", "right": "left", "up": "down", "down": "up"}
    flipped = [world.Combo(c.shape, c.color, reverse[c.direction], c.background) for c in COMBOS]
    assert i2v.score_i2v(gen, flipped, gen[:, 0], real)["direction_accuracy"] == 0.0


def test_first_frame_fidelity_sees_colour_background_and_position():
    combo = world.Combo("square", "red", "down", "grey")
    clip = i2v.render_i2v_clip(combo, 5)[None]
    given = clip[:, 0]
    other_colour = i2v.render_i2v_clip(world.Combo("square", "blue", "down", "grey"), 5)[None]
    other_bg = i2v.render_i2v_clip(world.Combo("square", "red", "down", "white"), 5)[None]
    moved = np.roll(clip, 3, axis=3)  # the object 3 px to the right
    shape = i2v.render_i2v_clip(world.Combo("triangle", "red", "down", "grey"), 5)[None]
    assert i2v.first_frame_match(clip, given).tolist() == [True]
    for wrong in (other_colour, other_bg, moved, shape):
        assert i2v.first_frame_match(wrong, given).tolist() == [False]
        assert i2v.first_frame_psnr(wrong, given)[0] < 30
    noisy = np.clip(clip + np.random.default_rng(0).normal(0, 0.02, clip.shape), 0, 1)
    assert i2v.first_frame_match(noisy, given).tolist() == [True]  # small noise is kept
    assert 30 < i2v.first_frame_psnr(noisy, given)[0] < 40
    with pytest.raises(ValueError, match="given must be the first frames"):
        i2v.first_frame_psnr(clip, given[0])


def test_goals():
    teacher = {"direction_accuracy": 0.9, "sec_per_clip": 2.0}
    good = {
        "direction_accuracy": 0.88,
        "first_frame_attributes": 0.99,
        "motion_ratio": 0.9,
        "sec_per_clip": 0.1,
    }
    assert all(g["met"] for g in i2v.check_i2v_goals(teacher, good))
    static = dict(good, motion_ratio=0.1)
    met = {g["goal"]: g["met"] for g in i2v.check_i2v_goals(teacher, static)}
    assert met == {
        "student_direction_ratio": True,
        "student_first_frame": True,
        "student_motion_error": False,
        "student_speedup": True,
    }
    slow = dict(good, sec_per_clip=0.5, direction_accuracy=0.8)
    met = {g["goal"]: g["met"] for g in i2v.check_i2v_goals(teacher, slow)}
    assert not met["student_speedup"] and not met["student_direction_ratio"]
    with pytest.raises(ValueError, match="student row lacks"):
        i2v.check_i2v_goals(teacher, {"direction_accuracy": 1.0, "sec_per_clip": 1.0})


# ------------------------------------- the image-to-video toy folder, its data, training


@pytest.fixture(scope="module")
def toy_i2v(tmp_path_factory):
    from fastwan.toy.assets import build_toy_pipeline
    from fastwan.toy.data import write_clip_dataset, write_prompt_dataset

    root = tmp_path_factory.mktemp("toy_i2v")
    folder = build_toy_pipeline(root / "init", task="ti2v")
    write_clip_dataset(root / "clips", folder, num_clips=6, task="i2v", progress=False)
    write_prompt_dataset(root / "prompts", folder, num_prompts=4, task="i2v", progress=False)
    return root, folder


def test_toy_i2v_rows_condition_on_the_clips_own_first_frame(toy_i2v):
    import json

    import torch

    from fastwan.data.dataset import LatentDataset
    from fastwan.data.encoders import vae_latent_stats
    from fastwan.models.loading import load_vae
    from fastwan.pipeline import decode_latents

    root, folder = toy_i2v
    assert json.loads((folder / "model_index.json").read_text())["expand_timesteps"] is True
    mean, std = vae_latent_stats(folder)
    ds = LatentDataset(
        root / "clips", text_length=16, latents_mean=mean, latents_std=std, image_condition=True
    )
    vae = load_vae(folder / "vae")
    for i in range(len(ds)):
        row = ds[i]
        assert row["first_frame_latent"].shape == (15, 1, 8, 8)  # 12 pixel + 3 coordinates
        # the pixel VAE encodes a lone frame as a clip's first latent frame: the condition
        # is the clip's own first latent frame, exactly what TI2V keeps clean
        torch.testing.assert_close(
            row["first_frame_latent"], row["latents"][:, :1], atol=1e-5, rtol=0
        )
        frame = decode_latents(vae, row["first_frame_latent"][None], device="cpu")[0, 0]
        assert np.abs(frame * 255 - row["pil_image"].numpy()).max() < 1.0
        # the rendered first frame is the image-to-video world's (the start is free)
        assert i2v.first_frame_match(
            row["pil_image"].numpy()[None, None] / 255.0, row["pil_image"].numpy()[None] / 255.0
        ).tolist() == [True]
    text = LatentDataset(root / "prompts", text_length=16, text_only=True, image_condition=True)
    assert len(text) == 4 and text[0]["first_frame_latent"].shape == (15, 1, 8, 8)
    with pytest.raises(ValueError, match="task must be"):
        from fastwan.toy.data import write_clip_dataset

        write_clip_dataset(root / "x", folder, num_clips=1, task="video")


def test_toy_i2v_teacher_recipe_trains(toy_i2v, tmp_path):
    """recipes/toy_i2v_teacher.yaml, 2 steps: flow on the i2v toy clips, the given frame
    clean in every input (build_trainer takes the TI2V folder + i2v shards as i2v)."""
    import math
    from pathlib import Path

    from fastwan.config import load_recipe
    from fastwan.train.build import build_trainer, trains_image_to_video

    root, folder = toy_i2v
    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "toy_i2v_teacher.yaml"
    recipe = load_recipe(
        recipe_path,
        [
            f"--model.teacher={folder}",
            f"--data.path={root / 'clips'}",
            f"--train.output_dir={tmp_path / 'run'}",
            "--train.max_steps=2",
            "--train.global_batch_size=1",
            "--train.micro_batch_size=1",
            "--train.checkpoint_interval=0",
            "--train.report_to=[]",
            "--train.ema_start_step=0",
            "--optim.generator.warmup_steps=1",
        ],
    )
    assert trains_image_to_video(folder, root / "clips")
    from _tiny_wan import write_random_video_shard

    (tmp_path / "t2v").mkdir()
    write_random_video_shard(tmp_path / "t2v")
    assert not trains_image_to_video(folder, tmp_path / "t2v")  # t2v shards: text-to-video
    assert trains_image_to_video(folder, root / "prompts")  # i2v_text: data-free i2v
    trainer = build_trainer(recipe, device="cpu", log_fn=lambda _l: None).trainer
    seen = []
    net = trainer.method.model
    handle = net.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["timestep"][:, :16].abs().max().item()),
        with_kwargs=True,
    )
    try:
        history = trainer.train()
    finally:
        handle.remove()
    assert len(history) == 2 and all(math.isfinite(r["generator_loss"]) for r in history)
    assert seen and max(seen) == 0.0  # the 16 tokens of the given frame: timestep 0


def test_the_shipped_toy_i2v_pair_loads_as_ti2v_models(tmp_path):
    """Every toy role ships (choices.TOY_ROLES); the I2V pair are TI2V models (the first
    latent frame is the image's), and shipping refuses an unknown role or a non-pipeline."""
    from fastwan.choices import TOY_ROLES
    from fastwan.pipeline import VideoGenerator
    from fastwan.toy.assets import ship_model, toy_model_path

    assert {toy_model_path(r).name for r in TOY_ROLES} == {f"toy-{r}" for r in TOY_ROLES}
    gen = VideoGenerator.from_pretrained("toy-i2v-student", device="cpu")
    assert gen.task == "ti2v" and gen.preset.few_step and gen.preset.attention == "vsa"
    first = i2v.render_i2v_batch([COMBOS[0]], [3])[0, 0]  # [H, W, 3]
    out = gen.generate(world.canonical_prompt(COMBOS[0]), image=first, seed=0)
    assert out.frames.shape == (1, world.NUM_FRAMES, world.SIZE, world.SIZE, 3)
    assert np.abs(out.frames[0, 0] - first).max() < 0.05  # the given frame is kept
    with pytest.raises(ValueError, match="role must be one of teacher, student, i2v-teacher"):
        ship_model(toy_model_path("i2v-student"), "i2v", dest_root=tmp_path)
    with pytest.raises(ValueError, match="not a pipeline folder"):
        ship_model(tmp_path, "i2v-student", dest_root=tmp_path)
    shipped = ship_model(toy_model_path("i2v-student"), "i2v-student", dest_root=tmp_path)
    assert shipped == tmp_path / "toy-i2v-student" and (shipped / "model_index.json").is_file()
