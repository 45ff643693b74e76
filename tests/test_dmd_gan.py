"""DMD2's GAN term (``dmd.gan_generator_weight`` / ``gan_critic_weight``) on a tiny Wan.

The term is checked in parts: its two losses against PyTorch's binary cross-entropy; that
turning it on adds exactly ``weight x gan_loss`` to each loss (the DMD and flow-matching
parts are unchanged, the critic's x0 included, which the generator step now takes from
its one critic call with gradient); that its gradient reaches the student and the head;
that the head learns to tell real latents from student samples; the recipe checks; and a
Trainer run that checkpoints and resumes the head with the critic.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM, RandomSamples, build_tiny_wan, collate_tensors

from fastwan.config import (
    ConfigError,
    DataConfig,
    DMDConfig,
    LoRAConfig,
    ModelConfig,
    OptimConfig,
    OptimConfigs,
    ParallelConfig,
    Recipe,
    TrainConfig,
    VSAConfig,
)
from fastwan.data.sampler import DistributedSampler, ResumableLoader
from fastwan.methods.dmd import DMDMethod, GANHead
from fastwan.methods.losses import gan_critic_loss, gan_generator_loss
from fastwan.models import load_transformer
from fastwan.train.trainer import Trainer

LATENT = (16, 2, 8, 8)  # C, T, H, W
GAN = {"gan_generator_weight": 0.5, "gan_critic_weight": 0.25}


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), num_layers=3)


def _dmd(**kw) -> DMDConfig:
    return DMDConfig(flow_shift=3.0, guidance_scale=2.0, generator_update_interval=2, **kw)


def _vsa() -> VSAConfig:
    return VSAConfig(sparsity=0.5, tile_size=(1, 2, 2), backend="torch")


def _negative() -> torch.Tensor:
    return torch.randn(MAX_TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(11))


def _method(wan_path, **dmd) -> DMDMethod:
    return DMDMethod(load_transformer(wan_path), _dmd(**dmd), _vsa(), _negative(), seed=3)


def _batch(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    ds = RandomSamples(n, seed, latent=LATENT)
    return collate_tensors([ds[i] for i in range(n)])


def test_gan_losses_are_binary_cross_entropy():
    rng = torch.Generator().manual_seed(0)
    real = torch.randn(5, generator=rng, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(7, generator=rng, dtype=torch.float64, requires_grad=True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ours = gan_critic_loss(real, fake)
    ref = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, (real, fake))
    g_ref = torch.autograd.grad(ref, (real, fake))
    torch.testing.assert_close(g_ours, g_ref)

    ours = gan_generator_loss(fake)
    ref = bce(fake, torch.ones_like(fake))  # the non-saturating generator loss
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(
        torch.autograd.grad(ours, fake)[0], torch.autograd.grad(ref, fake)[0]
    )
    zero = torch.zeros(3)
    assert math.isclose(float(gan_critic_loss(zero, zero)), 2 * math.log(2), rel_tol=1e-6)
    # bf16 logits are scored in float32
    assert gan_generator_loss(fake.detach().bfloat16()).dtype == torch.float32


def test_head_reads_the_middle_block_and_is_seeded(wan_path):
    method = _method(wan_path, **GAN)
    assert isinstance(method.critic.gan_head, GANHead)
    assert method._gan_block is method.critic.blocks[1]  # 3 blocks: the middle one
    assert not hasattr(method.student, "gan_head") and not hasattr(method.teacher, "gan_head")
    names = set(method.trained_parameters("critic"))
    assert {"gan_head.proj.weight", "gan_head.out.bias"} <= names
    again = _method(wan_path, **GAN).critic.gan_head.state_dict()
    for k, v in method.critic.gan_head.state_dict().items():
        assert torch.equal(v, again[k]), k
    other = DMDMethod(load_transformer(wan_path), _dmd(**GAN), _vsa(), _negative(), seed=4)
    assert not torch.equal(other.critic.gan_head.proj.weight, method.critic.gan_head.proj.weight)
    chosen = _method(wan_path, gan_feature_block=0, **GAN)
    assert chosen._gan_block is chosen.critic.blocks[0]
    with pytest.raises(ValueError, match=r"dmd.gan_feature_block is 3 but the critic has 3"):
        _method(wan_path, gan_feature_block=3, **GAN)


@pytest.mark.parametrize(
    ("rollout", "gan_max"), [("data", None), ("simulate", None), ("simulate", 0.3)]
)
def test_gan_adds_its_weighted_loss_and_nothing_else(wan_path, rollout, gan_max):
    # gan_max: the GAN's own noise levels (own critic calls) instead of the losses' calls
    off = _method(wan_path, rollout=rollout)
    on = _method(wan_path, rollout=rollout, gan_max_timestep_ratio=gan_max, **GAN)
    batch = _batch()
    for step, weight in (("generator_step", 0.5), ("critic_step", 0.25)):
        loss_off, info_off = getattr(off, step)(batch, torch.Generator().manual_seed(5))
        loss_on, info_on = getattr(on, step)(batch, torch.Generator().manual_seed(5))
        assert info_on["gan_loss"] > 0 and "gan_loss" not in info_off
        torch.testing.assert_close(
            loss_on - weight * info_on["gan_loss"], loss_off, rtol=1e-5, atol=1e-6
        )
        assert not math.isclose(loss_on.item(), loss_off.item(), rel_tol=1e-3)
        if gan_max is not None:  # its levels are its own, at most gan_max x 1000
            assert 20 <= info_on["gan_timestep"] <= 300
            assert info_on["gan_timestep"] != info_on["timestep"]
        else:
            assert "gan_timestep" not in info_on


def test_gan_gradient_reaches_the_student_and_the_head(wan_path):
    off = _method(wan_path)
    on = _method(wan_path, **GAN)
    batch = _batch()
    grads = []
    for method in (off, on):
        loss, _ = method.generator_step(batch, torch.Generator().manual_seed(2))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in method.student.parameters()]))
        assert all(p.grad is None for p in method.teacher.parameters())
    # the GAN term changes the student's gradient (the DMD part is the same, see above)
    assert (grads[1] - grads[0]).abs().max() > 1e-6 * grads[0].abs().max()
    on.critic.zero_grad(set_to_none=True)
    loss, _ = on.critic_step(batch, torch.Generator().manual_seed(2))
    loss.backward()
    head = on.critic.gan_head
    assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in on.teacher.parameters())


def test_head_learns_to_tell_real_latents_from_student_samples(wan_path):
    # real latents far from anything the student makes from noise: a separable problem
    # (at noise levels <= 0.3, where the offset survives the noise)
    method = _method(wan_path, max_timestep_ratio=0.3, **GAN)
    batch = _batch(4)
    batch["latents"] = batch["latents"] * 0.1 + 3.0
    opt = torch.optim.Adam(method.critic.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(0)
    history = []
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss, info = method.critic_step(batch, rng)
        loss.backward()
        opt.step()
        history.append(info)
    assert history[0]["gan_loss"] > 1.0  # near 2 log 2 at the start
    last = history[-5:]
    assert max(r["gan_loss"] for r in last) < 0.3, [r["gan_loss"] for r in last]
    assert min(r["gan_real_accuracy"] for r in last) == 1.0
    assert min(r["gan_fake_accuracy"] for r in last) == 1.0


def _recipe(out, *, steps: int, **over) -> Recipe:
    return Recipe(
        model=ModelConfig(teacher="tiny"),
        train=TrainConfig(
            method="dmd",
            max_steps=steps,
            global_batch_size=2,
            micro_batch_size=2,
            mixed_precision="fp32",
            seed=7,
            log_interval=1,
            checkpoint_interval=0,
            output_dir=str(out),
            ema_decay=0.9,
            ema_start_step=1,
        ),
        optim=OptimConfigs(generator=OptimConfig(lr=1e-3), critic=OptimConfig(lr=2e-3)),
        dmd=_dmd(**GAN),
        vsa=_vsa(),
        **over,
    )


def test_recipe_checks_name_the_field():
    with pytest.raises(ConfigError, match=r"gan_critic_weight: is 0 but gan_generator_weight"):
        DMDConfig(gan_generator_weight=0.1)
    with pytest.raises(ConfigError, match=r"gan_generator_weight: is 0 but gan_critic_weight"):
        DMDConfig(gan_critic_weight=0.1)
    with pytest.raises(ConfigError, match=r"gan_generator_weight: must be >= 0"):
        DMDConfig(gan_generator_weight=-1.0, gan_critic_weight=0.1)
    with pytest.raises(ConfigError, match=r"gan_max_timestep_ratio: must be > min_timestep"):
        DMDConfig(gan_max_timestep_ratio=0.01, **GAN)
    with pytest.raises(ConfigError, match=r"gan_feature_block: must be >= 0"):
        DMDConfig(gan_feature_block=-1)
    with pytest.raises(ConfigError, match=r"^data\.text_only: is true but dmd.gan_generator"):
        r = _recipe("o", steps=1)
        Recipe(
            **{
                **{f.name: getattr(r, f.name) for f in dataclasses.fields(r)},
                "data": DataConfig(path="p", text_only=True),
                "dmd": _dmd(rollout="simulate", **GAN),
            }
        )
    with pytest.raises(ConfigError, match=r"^dmd\.gan_generator_weight: > 0 is not supported "):
        _recipe("o", steps=1, lora=LoRAConfig(rank=4))
    with pytest.raises(ConfigError, match=r"^dmd\.gan_generator_weight: .*world_size is 2"):
        _recipe("o", steps=1, parallel=ParallelConfig(world_size=2, sequence_parallel=2))
    _recipe("o", steps=1)  # one process, full networks, latents: fine


def _loader() -> ResumableLoader:
    ds = RandomSamples(6, 0, latent=LATENT)
    return ResumableLoader(
        ds, DistributedSampler(len(ds), batch_size=2, seed=3), collate_fn=collate_tensors
    )


def test_trainer_checkpoints_and_resumes_the_head(wan_path, tmp_path):
    def run(out, steps, resume=False):
        recipe = _recipe(out, steps=4)
        trainer = Trainer(_method(wan_path, **GAN), recipe, _loader(), log_fn=lambda _l: None)
        if resume:
            assert trainer.resume() is not None
        trainer.train(steps)
        return trainer

    full = run(tmp_path / "full", 4)
    assert all("critic_gan_loss" in r for r in full.history)
    assert "generator_gan_loss" in full.history[0]  # step 0 updates the generator
    first = run(tmp_path / "half", 2)
    first.save_checkpoint()
    second = run(tmp_path / "half", 2, resume=True)

    def strip(history):
        return [{k: v for k, v in r.items() if k != "step_time"} for r in history]

    assert strip(second.history) == strip(full.history)
    a, b = full.networks["critic"].gan_head, second.networks["critic"].gan_head
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # the head trained: it moved from its seeded start
    start = _method(wan_path, **GAN).critic.gan_head.proj.weight
    assert not torch.equal(a.proj.weight, start)
    assert dataclasses.asdict(second.recipe.dmd)["gan_generator_weight"] == 0.5
