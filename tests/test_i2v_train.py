"""Image-to-video sparse distillation (``dmd``) and fine-tuning (``flow``) on tiny Wan
image-to-video folders (fp32, CPU).

* Wan2.2 TI2V (48 latent channels, per-token timesteps): latents ``[48, 2, 4, 4]`` = 5
  frames of 64 x 64 pixels; the condition is the clean first latent frame ``[48, 1, 4, 4]``.
* Wan2.1 I2V (36 input channels, CLIP cross-attention): latents ``[16, 2, 8, 8]``; the
  condition is the latent of ``[image, 0, ..., 0]`` ``[16, 2, 8, 8]`` plus the frame mask,
  and 17 CLIP tokens of dim 24.

Checked: every network input of a whole TI2V training step holds the given first frame
(timestep 0 on its tokens) and no loss depends on it; Wan2.1 I2V networks -- both CFG
branches of the teacher -- see the condition channels and the CLIP features; data-free
(``simulate``) training on text-only image rows; build_trainer end to end with validation
images beside the videos, EMA and a bitwise resume; LoRA; FSDP2 and sequence parallel on 2
gloo processes equal one process.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _tiny_wan import CLIP_DIM, CLIP_TOKENS, TEXT_DIM, build_tiny_wan_i2v
from PIL import Image

from fastwan.config import recipe_from_dict
from fastwan.data.schema import arrow_schema, i2v_row, i2v_text_row
from fastwan.diffusion.image_condition import i2v_condition

SHAPES = {  # variant -> (latent [C, T, H, W], first_frame_latent, clip [N, D] or None)
    "wan2.2": ((48, 2, 4, 4), (48, 1, 4, 4), None),
    "wan2.1": ((16, 2, 8, 8), (16, 2, 8, 8), (CLIP_TOKENS, CLIP_DIM)),
}
TILE = {"wan2.2": [1, 2, 2], "wan2.1": [1, 2, 2]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {
        v: build_tiny_wan_i2v(tmp_path_factory.mktemp(v.replace(".", "")), variant=v)
        for v in SHAPES
    }


def _write_shard(root, variant, *, n=4, text_only=False, seed=0):
    """An ``i2v`` (or ``i2v_text``) shard of ``n`` random rows of ``variant``'s shapes."""
    latent, first, clip = SHAPES[variant]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cond = {
            "clip_feature": rng.standard_normal(clip).astype(np.float32) if clip else None,
            "first_frame_latent": rng.standard_normal(first).astype(np.float32),
            "pil_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        }
        text = rng.standard_normal((3 + i, TEXT_DIM)).astype(np.float32)
        if text_only:
            rows.append(
                i2v_text_row(
                    id=f"p{i}",
                    text_embedding=text,
                    caption=f"prompt {i}",
                    file_name=f"{i}.png",
                    width=64,
                    height=64,
                    num_frames=5,
                    **cond,
                )  # fmt: skip
            )
        else:
            rows.append(
                i2v_row(
                    id=f"clip_{i}",
                    latent=rng.standard_normal(latent).astype(np.float32),
                    text_embedding=text,
                    caption=f"caption {i}",
                    file_name=f"{i}.mp4",
                    width=64,
                    height=64,
                    num_frames=5,
                    fps=16.0,
                    **cond,
                )  # fmt: skip
            )
    root.mkdir(parents=True, exist_ok=True)
    kind = "i2v_text" if text_only else "i2v"
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(kind)), root / "s.parquet")
    return root


def _recipe(out, folder, data, *, method="dmd", train=None, dmd=None, data_cfg=None, **extra):
    return recipe_from_dict(
        {
            "model": {"teacher": str(folder), "dtype": "fp32", "teacher_dtype": "fp32"},
            "train": {
                "method": method,
                "max_steps": 2,
                "mixed_precision": "fp32",
                "seed": 3,
                "log_interval": 1,
                "checkpoint_interval": 0,
                "output_dir": str(out),
                "report_to": [],
                **(train or {}),
            },
            "data": {
                "path": str(data),
                "num_workers": 0,
                "text_length": 16,
                "num_frames": 5,
                "height": 64,
                "width": 64,
                **(data_cfg or {}),
            },
            "optim": {"generator": {"lr": 1e-3}, "critic": {"lr": 1e-3}},
            "dmd": {
                "generator_update_interval": 1,
                "guidance_scale": 3.0,
                "negative_prompt": "low quality static",
                **(dmd or {}),
            },
            "vsa": {"sparsity": 0.5, "tile_size": TILE["wan2.2"], "backend": "torch"},
            **extra,
        }
    )


def _build(recipe, resume=None):
    from fastwan.train.build import build_trainer

    return build_trainer(recipe, device="cpu", log_fn=lambda _l: None, resume=resume)


def _networks(method):
    nets = {"student": method.student, "critic": method.critic, "teacher": method.teacher}
    return {k: v for k, v in nets.items() if v is not None}


class Recorder:
    """Forward pre-hooks on networks: every call's inputs, by network name."""

    def __init__(self, nets):
        self.calls = []
        self.handles = [
            net.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, net in nets.items()
        ]

    def _hook(self, name):
        def hook(_module, _args, kwargs):
            self.calls.append(
                {
                    "net": name,
                    "x": kwargs["hidden_states"].detach().clone(),
                    "t": kwargs["timestep"].detach().clone(),
                    "text": kwargs["encoder_hidden_states"].detach().clone(),
                    "image": (
                        kwargs["encoder_hidden_states_image"].detach().clone()
                        if kwargs.get("encoder_hidden_states_image") is not None
                        else None
                    ),
                }
            )

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------ Wan2.2 TI2V: frame 0 given


@pytest.mark.parametrize("rollout", ["data", "simulate"])
def test_ti2v_first_frame_is_the_given_one_through_a_whole_training_step(
    folders, tmp_path, rollout
):
    text_only = rollout == "simulate"
    data = _write_shard(tmp_path / "data", "wan2.2", text_only=text_only)
    recipe = _recipe(
        tmp_path / "run",
        folders["wan2.2"],
        data,
        dmd={"rollout": rollout},
        data_cfg={"text_only": text_only},
    )
    trainer = _build(recipe).trainer
    method = trainer.method
    batch = next(iter(trainer.data))
    assert batch["first_frame_latent"].shape == (1, 48, 1, 4, 4)
    given = batch["first_frame_latent"][:, :, 0].clone()  # [1, 48, 4, 4]
    # the student's x0 keeps the given frame, and no gradient reaches it
    x0, _ = method.student_sample(
        batch, torch.Generator().manual_seed(0), *_inputs(method, batch, with_image=True)
    )
    assert torch.equal(x0[:, :, 0], given)
    params = [p for p in method.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(x0[:, :, 0].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads)  # frame 0 trains nothing
    grads = torch.autograd.grad(x0[:, :, 1].sum(), params, allow_unused=True)
    assert any(g is not None and g.any() for g in grads)  # frame 1 does

    rec = Recorder(_networks(method))
    try:
        # step 0 updates the generator, then the critic (data read from the trainer's loader)
        trainer.data = _repeat(batch)
        trainer.train(1)
    finally:
        rec.remove()
    names = {c["net"] for c in rec.calls}
    assert names == {"student", "critic", "teacher"}
    tokens_per_frame = 2 * 2  # (4 / 2) x (4 / 2) patches of (1, 2, 2)
    for call in rec.calls:
        assert torch.equal(call["x"][:, :, 0], given), call["net"]  # clean, never noised
        assert call["t"].shape == (1, 2 * tokens_per_frame)  # per token
        assert torch.all(call["t"][:, :tokens_per_frame] == 0), call["net"]
        assert torch.all(call["t"][:, tokens_per_frame:] > 0), call["net"]
    # the teacher ran both CFG branches (guidance 3) with the same image and another text
    teacher = [c for c in rec.calls if c["net"] == "teacher"]
    assert len(teacher) == 2 and torch.equal(teacher[0]["x"], teacher[1]["x"])
    assert not torch.equal(teacher[0]["text"], teacher[1]["text"])
    assert torch.equal(batch["first_frame_latent"][:, :, 0], given)  # the batch is untouched


def _inputs(method, batch, with_image=False):
    cond, _neg, latents, image = method._inputs(batch)
    return (cond, latents, image) if with_image else (cond, latents)


def _repeat(batch):
    class Forever:
        def __iter__(self):
            while True:
                yield batch

        def state_dict(self):
            return {}

        def load_state_dict(self, _state):
            pass

    return Forever()


@pytest.mark.parametrize("method_name", ["dmd", "flow"])
def test_ti2v_losses_ignore_the_given_frame(folders, tmp_path, method_name):
    """Whatever the networks output on the given first frame, no loss changes."""
    data = _write_shard(tmp_path / "data", "wan2.2")
    recipe = _recipe(tmp_path / "run", folders["wan2.2"], data, method=method_name)
    trainer = _build(recipe).trainer
    method = trainer.method
    batch = next(iter(trainer.data))
    nets = _networks(method) if method_name == "dmd" else {"model": method.model}
    roles = method.roles

    def losses():
        return [
            float(method.loss(r, batch, torch.Generator().manual_seed(5))[0].detach())
            for r in roles
        ]

    base = losses()

    def wreck(_module, _args, output):  # a huge change of frame 0's prediction only
        out = output[0].clone()
        out[:, :, 0] += 1e3
        return (out,)

    handles = [n.register_forward_hook(wreck) for n in nets.values()]
    try:
        wrecked = losses()
    finally:
        for h in handles:
            h.remove()
    assert all(math.isfinite(v) for v in base)
    for a, b in zip(base, wrecked):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (base, wrecked)
    # ... while the same change on frame 1 does change them (the check can fail)

    def wreck1(_module, _args, output):
        out = output[0].clone()
        out[:, :, 1] += 1e3
        return (out,)

    handles = [n.register_forward_hook(wreck1) for n in nets.values()]
    try:
        moved = losses()
    finally:
        for h in handles:
            h.remove()
    assert any(not math.isclose(a, b, rel_tol=1e-3) for a, b in zip(base, moved))


# ------------------------------------------------------ Wan2.1 I2V: channels and CLIP


def test_wan21_networks_see_the_condition_channels_and_clip(folders, tmp_path):
    data = _write_shard(tmp_path / "data", "wan2.1")
    recipe = _recipe(tmp_path / "run", folders["wan2.1"], data)
    trainer = _build(recipe).trainer
    method = trainer.method
    batch = next(iter(trainer.data))
    want_cond = i2v_condition(batch["first_frame_latent"].float(), 5, 4)  # [1, 20, 2, 8, 8]
    rec = Recorder(_networks(method))
    try:
        for role in ("generator", "critic"):
            loss, _ = method.loss(role, batch, torch.Generator().manual_seed(1))
            assert math.isfinite(float(loss.detach()))
    finally:
        rec.remove()
    assert {c["net"] for c in rec.calls} == {"student", "critic", "teacher"}
    for call in rec.calls:
        assert call["x"].shape == (1, 36, 2, 8, 8)
        assert torch.equal(call["x"][:, 16:], want_cond), call["net"]
        assert torch.equal(call["image"], batch["clip_feature"].float()), call["net"]
        assert call["t"].shape == (1,)  # Wan2.1: one timestep per sample
    assert len([c for c in rec.calls if c["net"] == "teacher"]) == 2  # CFG: both with image
    # the mask marks the first latent frame (4 pixel frames), not the others
    assert torch.all(want_cond[:, :4, 0] == 1) and torch.all(want_cond[:, :4, 1] == 0)


def test_missing_image_conditions_are_named(folders, tmp_path):
    data = _write_shard(tmp_path / "data", "wan2.1")
    method = _build(_recipe(tmp_path / "run", folders["wan2.1"], data)).trainer.method
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(1, 16, 2, 8, 8),
        "text_embedding": torch.randn(1, 16, TEXT_DIM),
    }
    with pytest.raises(ValueError, match="first_frame_latent.*preprocess --task i2v"):
        method.loss("critic", batch, g)
    batch["first_frame_latent"] = torch.randn(1, 16, 2, 8, 8)
    with pytest.raises(ValueError, match="clip_feature"):
        method.loss("critic", batch, g)
    batch["clip_feature"] = torch.randn(1, CLIP_TOKENS, CLIP_DIM)
    batch["first_frame_latent"] = torch.randn(1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="clip's size"):
        method.loss("critic", batch, g)


def test_t2v_shards_refused_for_an_i2v_model(folders, tmp_path):
    from _tiny_wan import write_random_video_shard

    from fastwan.data.schema import SchemaError

    (tmp_path / "t2v").mkdir()
    data = write_random_video_shard(tmp_path / "t2v", latent=(16, 2, 8, 8))
    with pytest.raises(SchemaError, match="first_frame_latent"):
        _build(_recipe(tmp_path / "run", folders["wan2.1"], data))


# ------------------------------------------------------------ end to end through build


def test_wan21_data_free_dmd_validation_ema_and_resume(folders, tmp_path):
    """Data-free (simulate) DMD of the Wan2.1 I2V: images from text-only rows; validation
    videos with their conditioning image; EMA; 2 + 1 steps resumed equal 3 steps."""
    data = _write_shard(tmp_path / "data", "wan2.1", text_only=True)
    train = {
        "max_steps": 3,
        "ema_decay": 0.5,
        "validation_prompts": ["a red ball", "a blue cube"],
        "validation_seeds": [1],
        "validation_interval": 100,
        "checkpoint_interval": 2,
    }
    kw = dict(train=train, dmd={"rollout": "simulate"}, data_cfg={"text_only": True})
    full = _build(_recipe(tmp_path / "full", folders["wan2.1"], data, **kw)).trainer
    assert full.validator.images is not None and len(full.validator.images) == 2
    full.train()
    step3 = tmp_path / "full" / "validation" / "step-3"
    index = json.loads((step3 / "index.json").read_text())
    assert [v["image"] for v in index["videos"]] == ["p00-image.png", "p01-image.png"]
    assert index["grid"].startswith("rows: prompts, columns: the conditioning image")
    with Image.open(step3 / "grid.png") as grid:  # the image, then 4 of 5 frames
        assert grid.size == (64 + 2 + 4 * 64, 2 * 64 + 2)
        grid = np.asarray(grid)
    with Image.open(step3 / "p01-image.png") as img:
        assert np.array_equal(np.asarray(img), grid[66:130, :64])
    frames = full.validator.images[0][0]
    assert frames.shape == (64, 64, 3) and frames.dtype == np.uint8

    part = _build(_recipe(tmp_path / "part", folders["wan2.1"], data, **kw)).trainer
    part.train(2)
    assert (tmp_path / "part" / "checkpoint-2").is_dir()
    setup = _build(_recipe(tmp_path / "part", folders["wan2.1"], data, **kw), resume="latest")
    setup.trainer.resume(setup.resume_from)
    setup.trainer.train()
    for role in ("generator", "critic"):
        a = dict(full.networks[role].named_parameters())
        b = dict(setup.trainer.networks[role].named_parameters())
        for name in a:
            assert torch.equal(a[name], b[name]), (role, name)
    assert torch.equal(
        full.ema.shadow[next(iter(full.ema.shadow))],
        setup.trainer.ema.shadow[next(iter(setup.trainer.ema.shadow))],
    )


def test_ti2v_flow_and_lora_dmd_train(folders, tmp_path):
    data = _write_shard(tmp_path / "data", "wan2.2")
    flow = _build(_recipe(tmp_path / "flow", folders["wan2.2"], data, method="flow")).trainer
    before = {n: p.detach().clone() for n, p in flow.networks["generator"].named_parameters()}
    history = flow.train(2)
    assert all(math.isfinite(r["generator_loss"]) for r in history)
    moved = any(
        not torch.equal(before[n], p) for n, p in flow.networks["generator"].named_parameters()
    )
    assert moved
    lora = _build(_recipe(tmp_path / "lora", folders["wan2.2"], data, lora={"rank": 4})).trainer
    history = lora.train(2)
    assert all(math.isfinite(r["critic_loss"]) for r in history)
    assert lora.method.student is lora.method.teacher  # the shared base


def test_validation_images_fall_back_to_the_decoded_first_frame(folders, tmp_path):
    from fastwan.train.build import validation_images
    from fastwan.train.validation import load_validation_vae

    class Rows:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"first_frame_latent": torch.zeros(48, 1, 4, 4)}

    vae = load_validation_vae(folders["wan2.2"], "cpu")
    (frame, clip), again = validation_images(Rows(), 2, vae)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and clip is None
    assert np.array_equal(frame, again[0])  # prompt 2 takes row 2 mod 1
    with pytest.raises(ValueError, match="pil_image"):
        validation_images(Rows(), 1)


# ------------------------------------------------- FSDP2 / SP on 2 processes = 1 process

DIST_STEPS = 3


class RandomI2VSamples(torch.utils.data.Dataset):
    """Random latents, text and image conditions of ``variant``'s shapes; keys
    ``(index, epoch)`` like LatentDataset's."""

    def __init__(self, variant: str, n: int = 8, seed: int = 0):
        from _tiny_wan import MAX_TEXT_LEN

        latent, first, clip = SHAPES[variant]
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            item = {
                "latents": torch.randn(latent, generator=g),
                "text_embedding": torch.randn(MAX_TEXT_LEN, TEXT_DIM, generator=g),
                "text_mask": torch.arange(MAX_TEXT_LEN) < 5,
                "first_frame_latent": torch.randn(first, generator=g),
            }
            if clip is not None:
                item["clip_feature"] = torch.randn(clip, generator=g)
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        return self.items[key[0] if isinstance(key, tuple) else key]


def i2v_loader(variant: str, dp_rank: int, dp_size: int):
    from _dist import DATA_SEED
    from _tiny_wan import collate_tensors

    from fastwan.data.sampler import DistributedSampler, ResumableLoader

    ds = RandomI2VSamples(variant)
    sampler = DistributedSampler(
        len(ds), batch_size=1, dp_rank=dp_rank, dp_size=dp_size, seed=DATA_SEED
    )
    return ResumableLoader(ds, sampler, collate_fn=collate_tensors)


def dist_recipe(out, variant: str, **kw):
    from _dist import tiny_recipe

    recipe = tiny_recipe(out, steps=DIST_STEPS, **kw)
    # AdamW divides by sqrt(v) + eps: with eps 1e-6 a gradient entry near 1e-6 that is a
    # sum with cancellation (the time embedding's, over every token, split across SP ranks)
    # turns float32 reordering noise into 1e-5 parameter differences (seen: 31 of 1024
    # entries of time_embedder.linear_2); eps 1e-4 keeps the comparison about the math
    recipe.optim.generator.eps = recipe.optim.critic.eps = 1e-4
    if variant == "wan2.1":  # data-free: the student's own rollout from noise
        recipe.dmd.rollout = "simulate"
    return recipe


def dist_method(folder, variant: str, recipe, device: str = "cpu"):
    from _dist import negative_embedding

    from fastwan.methods.dmd import DMDMethod
    from fastwan.models import load_transformer

    return DMDMethod(
        load_transformer(folder, device=device),
        recipe.dmd,
        recipe.vsa,
        negative_embedding(),
        latent_shape=SHAPES[variant][0],
        expand_timesteps=variant == "wan2.2",
    )


def i2v_worker(cfgs: list[dict]) -> None:
    from _dist import full_params

    from fastwan.distributed.mesh import destroy_parallel, init_parallel
    from fastwan.distributed.parallelize import parallelize_method
    from fastwan.train.trainer import Trainer

    try:
        for cfg in cfgs:
            recipe = dist_recipe(
                cfg["out"],
                cfg["variant"],
                world_size=2,
                shard=cfg.get("shard", 2),
                sequence_parallel=cfg.get("sp", 1),
            )
            state = init_parallel(recipe.parallel, "cpu")
            method = dist_method(cfg["folder"], cfg["variant"], recipe, device="meta")
            parallelize_method(method, state, recipe)
            loader = i2v_loader(cfg["variant"], state.dp_rank, state.dp_size)
            trainer = Trainer(method, recipe, loader, log_fn=lambda _l: None, parallel=state)
            trainer.train(DIST_STEPS)
            params = {role: full_params(net) for role, net in trainer.networks.items()}
            ema = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                   for k, v in trainer.ema.shadow.items()}  # fmt: skip
            if state.is_main:
                torch.save(
                    {"history": trainer.history, "params": params, "ema": ema}, cfg["result"]
                )
    finally:
        destroy_parallel()


class _I2VInterleaved:
    """Rank 0's batch, rank 1's batch, ... (``_dist.interleaved_loader`` on i2v data)."""

    def __init__(self, variant: str, world: int):
        self.loaders = [i2v_loader(variant, r, world) for r in range(world)]

    def __iter__(self):
        iters = [iter(ld) for ld in self.loaders]
        while True:
            for r, it in enumerate(iters):
                yield {**next(it), "_rank": r}

    def state_dict(self):
        return self.loaders[0].state_dict()

    def load_state_dict(self, state):
        for ld in self.loaders:
            ld.load_state_dict(state)


@pytest.fixture(scope="module")
def dist_runs(folders, tmp_path_factory):
    from _dist import spawn

    root = tmp_path_factory.mktemp("i2v_dist")
    layouts = {
        "ti2v_fsdp": {"variant": "wan2.2", "shard": 2},
        "i2v_sp": {"variant": "wan2.1", "shard": 1, "sp": 2},
    }
    cfgs = [
        {
            "folder": str(folders[layout["variant"]]),
            "out": str(root / name),
            "result": str(root / f"{name}.pt"),
            **layout,
        }
        for name, layout in layouts.items()
    ]
    spawn(i2v_worker, 2, cfgs)
    return {n: torch.load(root / f"{n}.pt", weights_only=True) for n in layouts}


def test_ti2v_fsdp2_on_two_processes_equals_one(folders, tmp_path, dist_runs):
    from _dist import EmulatedRanks, assert_same_losses, assert_same_params

    from fastwan.train.trainer import Trainer

    recipe = dist_recipe(tmp_path / "ref", "wan2.2", accumulation=2)
    inner = dist_method(folders["wan2.2"], "wan2.2", recipe)
    method = EmulatedRanks(inner, recipe.train.seed, 2)
    ref = Trainer(method, recipe, _I2VInterleaved("wan2.2", 2), log_fn=lambda _l: None)
    ref.train(DIST_STEPS)
    got = dist_runs["ti2v_fsdp"]
    assert_same_losses(got["history"], ref.history)
    for role, net in ref.networks.items():
        assert_same_params(got["params"][role], dict(net.named_parameters()))
    assert_same_params(got["ema"], ref.ema.shadow)


def test_i2v_sequence_parallel_on_two_processes_equals_one(folders, tmp_path, dist_runs):
    from _dist import assert_same_losses, assert_same_params

    from fastwan.train.trainer import Trainer

    recipe = dist_recipe(tmp_path / "ref", "wan2.1")
    method = dist_method(folders["wan2.1"], "wan2.1", recipe)
    single = Trainer(method, recipe, i2v_loader("wan2.1", 0, 1), log_fn=lambda _l: None)
    single.train(DIST_STEPS)
    got = dist_runs["i2v_sp"]
    assert_same_losses(got["history"], single.history)
    for role, net in single.networks.items():
        assert_same_params(got["params"][role], dict(net.named_parameters()))


# ------------------------------------------------------------------------- the recipes

RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize(
    "name, teacher, sp, sparsity",
    [
        ("wan2.2_ti2v_5b_i2v_sparse_distill", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", 1, 0.8),
        ("wan2.1_i2v_14b_480p_sparse_distill", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", 4, 0.9),
    ],
)
def test_i2v_recipes_load_and_fit_8x8_h200(capsys, name, teacher, sp, sparsity):
    from fastwan.cli import main
    from fastwan.config import load_recipe
    from fastwan.models.presets import get_preset
    from fastwan.plan import plan_recipe

    path = RECIPES / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and f"distill recipes/{name}.yaml" in text  # its command
    recipe = load_recipe(path)
    assert recipe.model.teacher == teacher and recipe.train.method == "dmd"
    assert get_preset(teacher).task in ("i2v", "ti2v")
    assert recipe.vsa.enabled and recipe.vsa.sparsity == sparsity
    assert recipe.parallel.sequence_parallel == sp and recipe.parallel.world_size == 64
    assert recipe.parallel.replicate > 1 and recipe.parallel.shard > 1  # HSDP
    assert recipe.dmd.denoising_timesteps == [1000, 757, 522]
    plan = plan_recipe(recipe, nodes=8, gpus_per_node=8, gpu_memory_gb=141.0)
    assert plan.fits and not plan.fits_with("none")  # checkpointing is what makes it fit
    args = ["plan", str(path), "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gb", "141"]
    assert main(args) == 0
    assert "verdict: fits" in capsys.readouterr().out
