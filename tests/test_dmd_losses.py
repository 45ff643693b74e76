"""Loss functions of fastwan.methods.losses, checked against hand computation."""

from __future__ import annotations

import pytest
import torch

from fastwan.diffusion.flow import shift_sigma
from fastwan.methods import losses
from fastwan.methods.losses import (
    cfg_combine,
    dmd_generator_loss,
    dmd_gradient,
    fastvideo_to_standard_guidance,
    flow_matching_loss,
    sample_dmd_timesteps,
    standard_to_fastvideo_guidance,
)


def _inputs(shape=(3, 2, 4, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


# ---------------------------------------------------------------------------- dmd_gradient


def test_dmd_gradient_matches_hand_formula_per_sample():
    gen, real, fake = _inputs()
    g = dmd_gradient(gen, real, fake)
    for b in range(gen.shape[0]):
        norm = (gen[b] - real[b]).abs().mean()  # per-sample mean over C, T, H, W
        torch.testing.assert_close(g[b], (fake[b] - real[b]) / norm)
    # Not the batch-global normaliser: scaling one sample's error leaves the others alone.
    gen2 = gen.clone()
    gen2[0] = real[0] + 10 * (gen[0] - real[0])
    g2 = dmd_gradient(gen2, real, fake)
    torch.testing.assert_close(g2[1:], g[1:])
    torch.testing.assert_close(g2[0], g[0] / 10)


def test_dmd_gradient_is_detached_and_points_from_real_to_fake():
    gen, real, fake = (t.requires_grad_(True) for t in _inputs())
    g = dmd_gradient(gen, real, fake)
    assert not g.requires_grad
    # Sign: g is positive where the critic's x0 exceeds the teacher's. Exact: g is the
    # same float64 difference divided by a positive normaliser, which keeps every sign.
    assert torch.equal(torch.sign(g), torch.sign(fake - real))


def test_dmd_gradient_nan_safe_when_generator_equals_teacher():
    gen, _, fake = _inputs()
    real = gen.clone()  # normaliser mean|gen - real| = 0
    g = dmd_gradient(gen, real, fake)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, (fake - real) / losses.DMD_NORM_EPS)
    # All three equal: exactly zero, not nan (x - x = 0 in any rounding, 0 / eps = 0).
    g0 = dmd_gradient(gen, gen.clone(), gen.clone())
    assert torch.equal(g0, torch.zeros_like(g0))
    loss = dmd_generator_loss(gen.clone().requires_grad_(True), gen, gen)
    assert loss.item() == 0.0  # exact: 0.5 * mean(0 ** 2)
    # Non-finite inputs do not leak into the gradient.
    fake_bad = fake.clone()
    fake_bad[0, 0, 0, 0] = float("nan")
    fake_bad[1, 0, 0, 0] = float("inf")
    g_bad = dmd_gradient(gen, _inputs()[1], fake_bad)
    assert torch.isfinite(g_bad).all()
    assert g_bad[0, 0, 0, 0] == 0 and g_bad[1, 0, 0, 0] == 0  # exact: replaced by 0


def test_dmd_gradient_shape_errors():
    gen, real, fake = _inputs()
    with pytest.raises(ValueError, match="x0_fake has shape"):
        dmd_gradient(gen, real, fake[:2])
    with pytest.raises(ValueError, match="batch dimension"):
        dmd_gradient(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="eps must be > 0"):
        dmd_gradient(gen, real, fake, eps=0.0)


# ------------------------------------------------------------------------ generator loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generator_loss_gradient_is_g_over_numel(dtype):
    gen, real, fake = _inputs(dtype=dtype)
    gen = gen.requires_grad_(True)
    loss, g = dmd_generator_loss(gen, real, fake, return_grad=True)
    (grad,) = torch.autograd.grad(loss, gen)
    torch.testing.assert_close(grad, (g / gen.numel()).to(dtype))
    # Value: 0.5 * mean(g^2).
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())
    # The gradient is DMD's: (fake - real) / mean|gen - real| / numel, by hand.
    norm = (gen.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, ((fake - real) / norm / gen.numel()).to(dtype))


def test_generator_loss_only_x0_gen_gets_gradient():
    gen, real, fake = (t.requires_grad_(True) for t in _inputs())
    loss = dmd_generator_loss(gen, real, fake)
    loss.backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert real.grad is None and fake.grad is None


def test_generator_loss_descent_moves_towards_teacher():
    """A small descent step on the loss moves x0_gen towards the teacher x0."""
    gen, real, _ = _inputs()
    fake = gen.clone()  # critic says "x0 = where the generator is": g points from real to gen
    x = gen.clone().requires_grad_(True)
    loss = dmd_generator_loss(x, real, fake)
    loss.backward()
    x_new = x.detach() - 0.1 * gen.numel() * x.grad
    assert (x_new - real).abs().mean() < (gen - real).abs().mean()


def test_generator_loss_float32_from_bfloat16():
    gen, real, fake = _inputs(dtype=torch.bfloat16)
    gen = gen.requires_grad_(True)
    loss, g = dmd_generator_loss(gen, real, fake, return_grad=True)
    assert loss.dtype == torch.float32 and g.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, gen)
    assert grad.dtype == torch.bfloat16  # flows back in the caller's dtype
    # g equals the float32 computation on the upcast values (bf16 math would be coarser).
    # Exact: the loss calls dmd_gradient, which upcasts first: the same ops on the same
    # float32 tensors of the same shape, in this process.
    g32 = dmd_gradient(gen.detach().float(), real.float(), fake.float())
    torch.testing.assert_close(g, g32, rtol=0, atol=0)
    g_bf16_math = (fake - real) / (gen.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert not torch.equal(g, g_bf16_math.float())


# ----------------------------------------------------------------------------- timesteps


def test_sample_dmd_timesteps_range_shift_and_determinism():
    n = 20000
    s, t = sample_dmd_timesteps(n, torch.Generator().manual_seed(3), shift=3.0)
    assert s.shape == (n,) and t.shape == (n,) and s.dtype == torch.float32
    assert s.min() >= 0.02 and s.max() <= 0.98
    torch.testing.assert_close(t, 1000 * s)
    # Clamping puts mass exactly on the ends: P(s' > 0.98) with shift 3 = P(u > u*).
    u_star = 0.98 / (3 - 2 * 0.98)  # inverse of the shift at 0.98
    frac_top = float((s == 0.98).float().mean())  # exact: clamp returns the bound itself
    assert abs(frac_top - (1 - u_star)) < 0.01
    # The same u's, shifted by hand.
    u = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(s, shift_sigma(u, 3.0).clamp(0.02, 0.98).float())
    # Shift > 1 moves mass to high noise: median of s = shift(0.5) = 0.75 for shift 3.
    assert abs(float(s.median()) - 0.75) < 0.01
    # Same seed, same draws; different seed, different draws.
    s2, _ = sample_dmd_timesteps(n, torch.Generator().manual_seed(3), shift=3.0)
    s3, _ = sample_dmd_timesteps(n, torch.Generator().manual_seed(4), shift=3.0)
    assert torch.equal(s, s2) and not torch.equal(s, s3)  # exact: the same ops on the same draws
    # Custom ratios and no shift: uniform on the clamp range ends.
    s4, _ = sample_dmd_timesteps(1000, torch.Generator().manual_seed(0), 1.0, 0.3, 0.4)
    assert s4.min() >= 0.3 and s4.max() <= 0.4


def test_sample_dmd_timesteps_bad_input():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        sample_dmd_timesteps(4, g, shift=0.0)
    with pytest.raises(ValueError, match="min_ratio <= max_ratio"):
        sample_dmd_timesteps(4, g, 3.0, min_ratio=0.9, max_ratio=0.1)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        sample_dmd_timesteps(0, g, 3.0)
    with pytest.raises(ValueError, match="torch.Generator"):
        sample_dmd_timesteps(4, 1234, 3.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- CFG


def test_cfg_combine_standard_convention():
    cond = torch.tensor([[1.0, 2.0]])
    uncond = torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 4.5), torch.tensor([[2.75, 12.5]]))
    out = cfg_combine(cond.bfloat16(), uncond.bfloat16(), 4.5)
    assert out.dtype == torch.float32


def test_fastvideo_guidance_conversion():
    # exact: adding / subtracting 1 to these halves is exact in binary
    assert fastvideo_to_standard_guidance(3.5) == 4.5  # the published FastWan recipe value
    assert standard_to_fastvideo_guidance(4.5) == 3.5
    cond, uncond, _ = _inputs()
    w_fv = 3.5
    fastvideo_form = cond + w_fv * (cond - uncond)
    torch.testing.assert_close(
        cfg_combine(cond, uncond, fastvideo_to_standard_guidance(w_fv)), fastvideo_form
    )


# -------------------------------------------------------------------- flow-matching loss


def test_flow_matching_loss_hand_computed():
    x0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    eps = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    v_pred = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # target = eps - x0 = [[-1, -1], [2, 3]]; errors^2 = [[1, 1], [1, 4]]
    assert flow_matching_loss(v_pred, x0, eps).item() == pytest.approx(7 / 4)
    # Per-sample weight [B]: (1 * 2 + 3 * 5) / 4
    w = torch.tensor([1.0, 3.0])
    assert flow_matching_loss(v_pred, x0, eps, w).item() == pytest.approx(17 / 4)
    # Full-shape weight.
    wf = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert flow_matching_loss(v_pred, x0, eps, wf).item() == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        flow_matching_loss(v_pred, x0, eps, torch.ones(3))
    with pytest.raises(ValueError, match="v_pred"):
        flow_matching_loss(v_pred, x0, eps, torch.ones(2, 2, 2))


def test_flow_matching_loss_gradients_and_dtype():
    x0, eps, v = _inputs(dtype=torch.bfloat16)
    x0 = x0.requires_grad_(True)  # e.g. a generator sample: must get no gradient
    v = v.requires_grad_(True)
    loss = flow_matching_loss(v, x0, eps)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x0.grad is None
    expected = 2 * (v.detach().float() - (eps.float() - x0.detach().float())) / v.numel()
    torch.testing.assert_close(v.grad.float(), expected.to(torch.bfloat16).float())


def test_flow_matching_loss_zero_at_exact_velocity():
    x0, eps, _ = _inputs()
    # exact: the loss's target is the same float64 eps - x0, so every error is 0
    assert flow_matching_loss(eps - x0, x0, eps).item() == 0.0
