"""DMD on a problem with a known answer: distil a 2-D Gaussian-mixture "teacher".

The teacher is exact: a mixture of isotropic Gaussians stays a mixture under
``x_t = (1 - s) x0 + s eps``; component k becomes ``N((1 - s) mu_k, c_k I)`` with
``c_k = (1 - s)^2 sigma_k^2 + s^2``, and the posterior mean is

    E[x0 | x_t] = sum_k r_k(x_t) [mu_k + (1 - s) sigma_k^2 / c_k (x_t - (1 - s) mu_k)],
    r_k(x_t) = softmax_k(log pi_k - |x_t - (1 - s) mu_k|^2 / (2 c_k) - (d / 2) log c_k).

A one-step MLP generator (noise z -> 2-D sample) is trained with
:func:`dmd_generator_loss` (real = exact teacher x0, fake = critic x0), and an MLP critic
with :func:`flow_matching_loss` on stop-gradient generator samples, five critic steps
per generator step (DMD2's two-time-scale rule). The test checks that the generator's
distribution approaches the mixture (energy distance), that every component gets its
share of samples, that the critic tracks the generator rather than the teacher, and that
flipping the sign of the DMD gradient makes things worse (so the test can fail).

Everything is seeded through one explicit ``torch.Generator``; float32; a few seconds on
one CPU core.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastwan.diffusion.flow import add_noise, x0_from_velocity
from fastwan.methods.losses import (
    dmd_generator_loss,
    dmd_gradient,
    flow_matching_loss,
    sample_dmd_timesteps,
)

# The mixture: unequal weights and widths so that matching the *distribution* (not just
# landing on some mode) is tested.
MEANS = torch.tensor([[1.5, 1.0], [-1.5, 1.0], [0.0, -1.5]])  # [K, 2]
STDS = torch.tensor([0.25, 0.4, 0.3])  # [K]
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])  # [K]

BATCH = 256
GEN_STEPS = 300  # generator updates
CRITIC_PER_GEN = 5  # generator_update_interval
CRITIC_WARMUP = 300  # critic steps on the initial generator (DMD starts the critic as a
# copy of the teacher; the toy's teacher is analytic, so the critic is fitted first)
SHIFT = 1.0
N_EVAL = 2000


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: threads only add synchronisation (and suffer on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def teacher_x0(x_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x_t] of the mixture. x_t: [B, 2], s: [B] -> [B, 2]."""
    a = (1 - s)[:, None]  # [B, 1]
    var = a**2 * STDS[None] ** 2 + s[:, None] ** 2  # [B, K]
    diff = x_t[:, None, :] - a[:, :, None] * MEANS[None]  # [B, K, 2]
    d = x_t.shape[1]
    logp = WEIGHTS.log()[None] - 0.5 * (diff**2).sum(-1) / var - 0.5 * d * var.log()  # [B, K]
    resp = torch.softmax(logp, dim=1)  # [B, K]
    mean_k = MEANS[None] + (a * STDS[None] ** 2 / var)[..., None] * diff  # [B, K, 2]
    return (resp[..., None] * mean_k).sum(1)


def sample_mixture(n: int, rng: torch.Generator) -> torch.Tensor:
    """n samples [n, 2] of the mixture."""
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=rng)
    return MEANS[k] + STDS[k, None] * torch.randn(n, 2, generator=rng)


class MLP(torch.nn.Module):
    """SiLU MLP whose parameters are drawn from an explicit ``rng``."""

    def __init__(self, sizes: list[int], rng: torch.Generator, out_scale: float = 1.0):
        super().__init__()
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            w = torch.randn(n_out, n_in, generator=rng) / math.sqrt(n_in)
            if i == len(sizes) - 2:
                w = w * out_scale
            self.weights.append(torch.nn.Parameter(w))
            self.biases.append(torch.nn.Parameter(torch.zeros(n_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.nn.functional.linear(x, w, b)
            if i < len(self.weights) - 1:
                x = torch.nn.functional.silu(x)
        return x


class Critic(torch.nn.Module):
    """Velocity predictor v(x_t, s): [B, 2], [B] -> [B, 2]."""

    def __init__(self, rng: torch.Generator, hidden: int = 128):
        super().__init__()
        self.net = MLP([2 + 3, hidden, hidden, hidden, 2], rng, out_scale=0.5)

    def forward(self, x_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s_ = s[:, None]  # [B, 1]
        feats = [x_t, s_, torch.sin(math.pi * s_), torch.cos(math.pi * s_)]
        return self.net(torch.cat(feats, dim=1))


def component_shares(x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples x [N, 2] whose most likely component (Bayes rule) is k -> [K]."""
    z2 = (torch.cdist(x, MEANS) / STDS[None]) ** 2  # [N, K]
    logp = WEIGHTS.log()[None] - 0.5 * z2 - 2 * STDS.log()[None]  # [N, K], d = 2
    return torch.bincount(logp.argmax(1), minlength=len(WEIGHTS)).float() / len(x)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic), x: [N, 2], y: [M, 2]."""
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)


class DMDToy:
    """Generator + critic + exact teacher, trained with fastwan's DMD loss functions."""

    def __init__(self, seed: int = 0):
        self.rng = torch.Generator().manual_seed(seed)
        self.generator = MLP([2, 128, 128, 2], self.rng)
        self.critic = Critic(self.rng)
        # DMD2 uses beta1 = 0 for both networks.
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=(0.0, 0.99))
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=1e-3, betas=(0.0, 0.99))
        self.z_eval = torch.randn(N_EVAL, 2, generator=self.rng)  # fixed evaluation noise
        self.reference = sample_mixture(N_EVAL, self.rng)  # fixed mixture samples

    def critic_x0(self, x_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x0_from_velocity(x_t, self.critic(x_t, s), s)

    def critic_step(self) -> None:
        with torch.no_grad():
            x0 = self.generator(torch.randn(BATCH, 2, generator=self.rng))  # [B, 2]
        s, _ = sample_dmd_timesteps(BATCH, self.rng, SHIFT)
        eps = torch.randn(BATCH, 2, generator=self.rng)
        x_t = add_noise(x0, eps, s)
        loss = flow_matching_loss(self.critic(x_t, s), x0, eps)
        self.opt_c.zero_grad()
        loss.backward()
        self.opt_c.step()

    def generator_step(self, sign: float = 1.0) -> None:
        x0 = self.generator(torch.randn(BATCH, 2, generator=self.rng))  # [B, 2], with grad
        s, _ = sample_dmd_timesteps(BATCH, self.rng, SHIFT)
        eps = torch.randn(BATCH, 2, generator=self.rng)
        with torch.no_grad():
            x_t = add_noise(x0, eps, s)
            x0_real = teacher_x0(x_t, s)
            x0_fake = self.critic_x0(x_t, s)
        if sign > 0:
            loss = dmd_generator_loss(x0, x0_real, x0_fake)
        else:  # the same loss with the DMD gradient's sign flipped
            g = dmd_gradient(x0, x0_real, x0_fake)
            loss = 0.5 * torch.mean((x0 - (x0 + g).detach()) ** 2)
        self.opt_g.zero_grad()
        loss.backward()
        self.opt_g.step()

    def train(self, gen_steps: int, sign: float = 1.0) -> None:
        for i in range(gen_steps * CRITIC_PER_GEN):
            self.critic_step()
            if i % CRITIC_PER_GEN == 0:
                self.generator_step(sign)

    @torch.no_grad()
    def samples(self) -> torch.Tensor:
        return self.generator(self.z_eval)  # [N_EVAL, 2]

    def distance(self) -> float:
        return energy_distance(self.samples(), self.reference)

    @torch.no_grad()
    def denoising_errors(self) -> tuple[float, float, float]:
        """(critic, teacher) x0 MSE on noised generator samples, and critic-teacher MSE."""
        rng = torch.Generator().manual_seed(1234)
        x0 = self.generator(torch.randn(4000, 2, generator=rng))
        s = 0.02 + 0.96 * torch.rand(4000, generator=rng)
        x_t = add_noise(x0, torch.randn(4000, 2, generator=rng), s)
        fake, real = self.critic_x0(x_t, s), teacher_x0(x_t, s)
        mse = lambda a, b: float(((a - b) ** 2).sum(1).mean())
        return mse(fake, x0), mse(real, x0), mse(fake, real)


def test_teacher_posterior_mean_matches_monte_carlo():
    """The closed-form E[x0 | x_t] agrees with self-normalised importance sampling."""
    rng = torch.Generator().manual_seed(7)
    x0 = sample_mixture(400_000, rng).double()  # [N, 2]
    x_t = torch.tensor([[1.0, 0.5], [-0.3, -1.0], [0.2, 0.9]], dtype=torch.float64)
    for s_val in (0.1, 0.5, 0.9):
        s = torch.full((3,), s_val, dtype=torch.float64)
        # p(x_t | x0) = N((1 - s) x0, s^2 I): weights over the prior samples.
        logw = -((x_t[:, None, :] - (1 - s_val) * x0[None]) ** 2).sum(-1) / (2 * s_val**2)
        w = torch.softmax(logw, dim=1)  # [3, N]
        mc = w @ x0  # [3, 2]
        exact = teacher_x0(x_t.float(), s.float()).double()
        ess = float(1 / (w**2).sum(1).min())
        assert ess > 200, f"too few effective samples ({ess:.0f}) for s={s_val}"
        torch.testing.assert_close(exact, mc, atol=0.03, rtol=0)


def test_dmd_distils_gaussian_mixture():
    toy = DMDToy(seed=0)
    floor = energy_distance(
        sample_mixture(N_EVAL, torch.Generator().manual_seed(99)), toy.reference
    )
    d0 = toy.distance()
    for _ in range(CRITIC_WARMUP):
        toy.critic_step()
    crit0, teach0, _ = toy.denoising_errors()
    toy.train(GEN_STEPS)
    d1 = toy.distance()
    crit1, teach1, gap1 = toy.denoising_errors()

    # The distribution approaches the mixture: energy distance to <10% of its start and
    # under an absolute bound (the two-sample noise floor is ~1e-3; seeds 0-3 reach
    # 0.02-0.05).
    assert d0 > 0.5, f"the untrained generator should be far from the mixture (d0={d0:.3f})"
    assert d1 < 0.1 * d0, f"energy distance {d0:.4f} -> {d1:.4f}: less than a 10x drop"
    assert d1 < 0.08, f"energy distance {d1:.4f} >= 0.08 (noise floor {floor:.4f})"

    # Mode coverage: every component gets 70%..130% of its weight in samples (assigned
    # by the Bayes rule under the mixture; seeds 0-3 stay within 20%), and most samples
    # lie within 3 sigma of a component (exact sampling: 99%; DMD leaves thin bridges
    # between modes; seeds 0-3 reach 74-78%).
    x = toy.samples()
    shares = component_shares(x)
    for k in range(len(WEIGHTS)):
        assert 0.7 * WEIGHTS[k] < shares[k] < 1.3 * WEIGHTS[k], (
            f"component {k}: share {shares[k]:.3f} vs weight {WEIGHTS[k]:.2f} "
            f"(all shares {shares.tolist()})"
        )
    z = torch.cdist(x, MEANS) / STDS[None]  # [N, K] distance in units of sigma_k
    inside = float((z.min(1).values < 3.0).float().mean())
    assert inside > 0.7, f"only {inside:.2f} of samples within 3 sigma of a component"

    # The critic tracks the generator: on the initial generator's noised samples its x0
    # error is a small fraction of the teacher's (it models the generator, not the data);
    # at the end (generator ~ mixture) it is no worse than the teacher's and the two agree.
    assert crit0 < 0.35 * teach0, f"critic x0 MSE {crit0:.3f} vs teacher {teach0:.3f}"
    assert crit1 < 1.05 * teach1, f"critic x0 MSE {crit1:.3f} vs teacher {teach1:.3f}"
    assert gap1 < 0.1 * teach1, f"critic-teacher x0 MSE {gap1:.3f} vs teacher {teach1:.3f}"


def test_flipped_dmd_gradient_diverges():
    """With -g the distance grows; with +g (same start, same draws) it falls. Deterministic."""
    runs = {}
    for name, sign in (("plus", 1.0), ("plus_again", 1.0), ("minus", -1.0)):
        toy = DMDToy(seed=0)
        d0 = toy.distance()
        for _ in range(CRITIC_WARMUP):
            toy.critic_step()
        toy.train(20, sign=sign)
        runs[name] = (d0, toy.distance(), toy.samples())
    d0 = runs["plus"][0]
    assert runs["plus"][1] < 0.5 * d0, f"+g: {d0:.3f} -> {runs['plus'][1]:.3f}"
    assert runs["minus"][1] > d0, f"-g should push away: {d0:.3f} -> {runs['minus'][1]:.3f}"
    # Same seed, same result, bit for bit: the same ops on the same draws in one process
    # at one thread (the fixture), so even the float32 summation order is the same.
    assert torch.equal(runs["plus"][2], runs["plus_again"][2])
