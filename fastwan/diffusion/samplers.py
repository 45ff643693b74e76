"""Samplers: pure functions with one signature, k-diffusion style.

    sampler(model_fn, noise, timesteps, rng, **options) -> x0

``model_fn(x_t, t)`` takes latents ``x_t`` ``[B, ...]`` (float32) and timesteps ``t``
``[B]`` in [0, 1000] and returns the predicted velocity ``v = eps - x0`` (see
``fastwan.diffusion.flow``). Guidance belongs to the model function (:func:`cfg`), so
every sampler serves teachers (CFG) and students (none) alike. ``rng`` is a
``torch.Generator`` (or None for the deterministic samplers).

* :func:`sample_dmd`: few-step DMD (predict x0 at each listed timestep, re-noise with fresh
  noise from the caller's ``rng`` to the next, return the last x0).
* :func:`sample_euler`: multi-step flow-matching Euler to t = 0.
* :func:`sample_scheduler`: multi-step with a diffusers scheduler (UniPC for Wan).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from fastwan.diffusion.flow import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    shift_sigma,
    sigma_of,
    x0_from_velocity,
)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Called after every step with {"i", "total", "t", "x"} (x: the latents after the step);
# a tensor it returns replaces x (anything else is ignored: progress bars return values;
# diffusers' callback_on_step_end may edit the latents).
Callback = Callable[[dict], "torch.Tensor | None"]


def cfg(cond_fn: ModelFn, uncond_fn: ModelFn, guidance_scale: float) -> ModelFn:
    """Classifier-free guidance: ``v_u + w (v_c - v_u)``; the conditional alone at w = 1."""
    if guidance_scale <= 0:
        raise ValueError(f"guidance_scale must be > 0, got {guidance_scale!r}")
    if guidance_scale == 1.0:
        return cond_fn

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c = cond_fn(x, t)
        v_u = uncond_fn(x, t)
        return v_u + guidance_scale * (v_c - v_u)

    return guided


def flow_timesteps(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps`` timesteps in (0, 1000], descending from 1000: sigmas evenly spaced in
    (0, 1], then shifted (SD3 eq. 23). Returns float32 ``[num_steps]``."""
    _check_steps(num_steps)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]  # drop s = 0
    return (shift_sigma(s, shift) * NUM_TRAIN_TIMESTEPS).to(torch.float32)


def _check_steps(num_steps) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"the number of steps must be a positive int, got {num_steps!r}")


def _check_noise(noise) -> None:
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise ValueError("noise must be a floating-point tensor [B, ...]")


def _as_timesteps(timesteps) -> list[float]:
    """Validate a descending list of timesteps in (0, 1000]."""
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.detach().cpu().tolist()
    try:
        ts = [float(t) for t in timesteps]
    except TypeError:
        raise ValueError(f"timesteps must be a sequence of numbers, got {timesteps!r}") from None
    if not ts:
        raise ValueError("timesteps must not be empty; e.g. [1000, 757, 522]")
    if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in ts):
        raise ValueError(f"timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    return ts


def _timestep_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)  # [B]


def sample_dmd(
    model_fn: ModelFn,
    noise: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    rng: torch.Generator | None,
    *,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Few-step DMD sampling (FastWan: timesteps [1000, 757, 522]).

    At each timestep t_i (noise level s_i = t_i / 1000): x0 = x_t - s_i v; then, unless it
    is the last, x_{t_{i+1}} = (1 - s_{i+1}) x0 + s_{i+1} eps with eps fresh from
    ``rng``. Returns the last x0 (float32). The first step's input is ``noise``
    itself (taken as x at t_0; exact when t_0 = 1000).
    """
    _check_noise(noise)
    ts = _as_timesteps(timesteps)
    if len(ts) > 1 and not isinstance(rng, torch.Generator):
        raise ValueError(
            "sample_dmd re-noises between steps: pass rng=torch.Generator()."
            "manual_seed(seed) (the same one that drew the initial noise)"
        )
    x = noise.to(torch.float32)
    x0 = x
    for i, t in enumerate(ts):
        v = model_fn(x, _timestep_batch(t, x)).to(torch.float32)
        x0 = x0_from_velocity(x, v, sigma_of(t))
        if i + 1 < len(ts):
            eps = torch.randn(x0.shape, generator=rng, device=rng.device, dtype=torch.float32).to(
                x0.device
            )
            x = add_noise(x0, eps, sigma_of(ts[i + 1]))
        if callback is not None:
            last = i + 1 == len(ts)
            out = callback({"i": i, "total": len(ts), "t": t, "x": x0 if last else x})
            if isinstance(out, torch.Tensor):
                x0, x = (out, x) if last else (x0, out)
    return x0


def sample_euler(
    model_fn: ModelFn,
    noise: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    rng: torch.Generator | None = None,
    *,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Flow-matching Euler from ``timesteps[0]`` to t = 0: x <- x + (s_next - s) v.

    ``timesteps`` e.g. :func:`flow_timesteps` (num_steps, shift). Deterministic: the
    ``rng`` is accepted for the common signature and unused. Returns float32 x0.
    """
    del rng  # deterministic ODE solver
    _check_noise(noise)
    ts = _as_timesteps(timesteps)
    x = noise.to(torch.float32)
    sigmas = [sigma_of(t) for t in ts] + [0.0]
    for i, t in enumerate(ts):
        v = model_fn(x, _timestep_batch(t, x)).to(torch.float32)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if callback is not None:
            out = callback({"i": i, "total": len(ts), "t": t, "x": x})
            x = out if isinstance(out, torch.Tensor) else x
    return x


def sample_scheduler(
    model_fn: ModelFn,
    noise: torch.Tensor,
    timesteps: int,
    rng: torch.Generator | None = None,
    *,
    scheduler,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Multi-step sampling with a diffusers flow-matching scheduler (UniPC for Wan).

    ``timesteps``: the number of steps; the scheduler lays them out (its flow shift
    included). The scheduler is stateful: pass a fresh one per call (``from_config``).
    ``rng`` reaches ``scheduler.step`` (as its ``generator``) when that takes one
    (stochastic schedulers).
    """
    _check_noise(noise)
    _check_steps(timesteps)
    if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
        raise ValueError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
    scheduler.set_timesteps(timesteps, device=noise.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # as diffusers' pipelines do: no timestep lookup
    step_kwargs = {"return_dict": False}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = rng
    x = noise.to(torch.float32)
    steps = scheduler.timesteps
    for i, t in enumerate(steps):
        v = model_fn(x, t.expand(x.shape[0]))  # [B], in the scheduler's timestep dtype
        x = scheduler.step(v, t, x, **step_kwargs)[0]
        if callback is not None:
            out = callback({"i": i, "total": len(steps), "t": float(t), "x": x})
            x = out if isinstance(out, torch.Tensor) else x
    return x.to(torch.float32)


SAMPLERS = {"dmd": sample_dmd, "euler": sample_euler, "scheduler": sample_scheduler}
