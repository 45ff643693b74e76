"""Samplers: the few-step DMD sampler, flow-matching Euler, diffusers schedulers, CFG."""

from __future__ import annotations

import pytest
import torch

from fastwan.diffusion.flow import add_noise
from fastwan.diffusion.samplers import (
    cfg,
    flow_timesteps,
    sample_dmd,
    sample_euler,
    sample_scheduler,
)

SHAPE = (2, 4, 3, 4, 4)  # [B, C, T, H, W]


def _target(seed: int = 7) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _oracle_fn(x0: torch.Tensor, calls: list):
    """The exact velocity field of a data distribution concentrated at ``x0``:
    v(x_t, t) = (x_t - x0) / s, so x_t - s v = x0 for every input."""

    def fn(x, t):
        calls.append((x.clone(), t.clone()))
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return (x - x0) / s

    return fn


def test_dmd_uses_exactly_the_listed_timesteps_and_the_callers_rng():
    x0 = _target()
    calls = []
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g)
    out = sample_dmd(_oracle_fn(x0, calls), noise, [1000, 757, 522], g)

    # exact: integer timesteps are exact in float32
    assert [c[1].tolist() for c in calls] == [[1000.0] * 2, [757.0] * 2, [522.0] * 2]
    # Replay the caller's rng: initial noise, then one fresh draw per re-noising.
    g2 = torch.Generator().manual_seed(0)
    # exact: the model's first input is the caller's noise itself, the same seeded draw
    assert torch.equal(torch.randn(SHAPE, generator=g2), calls[0][0])
    eps1, eps2 = torch.randn(SHAPE, generator=g2), torch.randn(SHAPE, generator=g2)
    torch.testing.assert_close(calls[1][0], add_noise(x0, eps1, 0.757))
    torch.testing.assert_close(calls[2][0], add_noise(x0, eps2, 0.522))
    torch.testing.assert_close(out, x0)  # the last x0, not re-noised
    assert out.dtype == torch.float32


def test_dmd_same_seed_same_result_different_seed_different_result():
    def model(x, t):  # a non-trivial model: the output depends on the re-noising draws
        return torch.tanh(x) * (t / 1000).view(-1, 1, 1, 1, 1)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sample_dmd(model, torch.randn(SHAPE, generator=g), [1000, 757, 522], g)

    assert torch.equal(run(3), run(3))  # exact: the same ops on the same draws, one process
    assert not torch.allclose(run(3), run(4))


def test_dmd_callback_and_validation():
    seen = []
    g = torch.Generator().manual_seed(0)
    sample_dmd(
        lambda x, t: x, torch.zeros(SHAPE), [1000, 500], g, callback=lambda i: seen.append(i)
    )
    assert [(i["i"], i["total"], i["t"]) for i in seen] == [(0, 2, 1000.0), (1, 2, 500.0)]
    with pytest.raises(ValueError, match="pass rng="):
        sample_dmd(lambda x, t: x, torch.zeros(SHAPE), [1000, 500], None)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_dmd(lambda x, t: x, torch.zeros(SHAPE), [522, 757], g)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1000\]"):
        sample_dmd(lambda x, t: x, torch.zeros(SHAPE), [1200, 500], g)
    with pytest.raises(ValueError, match="must not be empty"):
        sample_dmd(lambda x, t: x, torch.zeros(SHAPE), [], g)
    with pytest.raises(ValueError, match="noise must be a floating-point tensor"):
        sample_dmd(lambda x, t: x, torch.zeros(SHAPE, dtype=torch.long), [1000], g)
    # One step needs no fresh noise, so no rng.
    x0 = _target()
    out = sample_dmd(_oracle_fn(x0, []), torch.zeros(SHAPE), [1000], None)
    torch.testing.assert_close(out, x0)


def test_flow_timesteps_are_shifted_and_descending():
    ts = flow_timesteps(4, shift=1.0)
    torch.testing.assert_close(ts, torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    shifted = flow_timesteps(4, shift=8.0)
    # exact: s = 1 maps to 8 * 1 / (1 + 7 * 1) = 1 in any rounding, times 1000
    assert shifted[0] == 1000 and bool((shifted[1:] > ts[1:]).all())  # shift > 1: noisier
    # s' = 8 s / (1 + 7 s) at s = 0.25.
    assert float(shifted[-1]) == pytest.approx(1000 * 2.0 / 2.75, rel=1e-6)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            flow_timesteps(bad)


def test_euler_is_exact_on_straight_flows_and_deterministic():
    x0 = _target()
    calls = []
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ts = flow_timesteps(5, shift=3.0)
    out = sample_euler(_oracle_fn(x0, calls), noise, ts)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack([c[1][0] for c in calls]), ts)
    # Mid-way the sample lies on the straight line from the noise to x0.
    s1 = float(ts[1]) / 1000
    torch.testing.assert_close(calls[1][0], add_noise(x0, noise, s1), rtol=1e-5, atol=1e-5)


def test_scheduler_sampler_with_flow_match_euler_equals_fastwan_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    def model(x, t):
        return torch.sin(x) + (t / 1000).view(-1, 1, 1, 1, 1)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    out = sample_scheduler(model, noise, 6, None, scheduler=sched)
    ours = sample_euler(model, noise, sched.timesteps)  # the same grid, fastwan's Euler
    torch.testing.assert_close(out, ours, rtol=1e-5, atol=1e-5)


def test_scheduler_sampler_drives_unipc_to_the_data_point():
    from diffusers import UniPCMultistepScheduler

    x0 = _target()
    calls = []
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    # UniPC hands the model integer timesteps; its noise levels are the exact sigmas.
    grid = UniPCMultistepScheduler.from_config(sched.config)
    grid.set_timesteps(4)
    sigma = dict(zip(grid.timesteps.tolist(), grid.sigmas.tolist()))

    def oracle(x, t):
        calls.append(t.clone())
        s = torch.tensor([sigma[int(v)] for v in t]).view(-1, 1, 1, 1, 1)
        return (x - x0) / s

    out = sample_scheduler(oracle, noise, 4, None, scheduler=sched)
    assert [int(c[0]) for c in calls] == grid.timesteps.tolist()
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="diffusers scheduler"):
        sample_scheduler(lambda x, t: x, noise, 4, None, scheduler=object())


def test_cfg_combines_conditional_and_unconditional():
    def cond(x, t):
        return x + 1.0

    def uncond(x, t):
        return x - 1.0

    x, t = torch.zeros(2, 3), torch.full((2,), 500.0)
    torch.testing.assert_close(cfg(cond, uncond, 5.0)(x, t), torch.full((2, 3), 9.0))
    assert cfg(cond, uncond, 1.0) is cond  # w = 1: one forward, no guidance
    with pytest.raises(ValueError, match="guidance_scale must be > 0"):
        cfg(cond, uncond, 0.0)
