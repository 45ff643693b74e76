"""Rectified-flow (flow-matching) math used by Wan, in one place.

Convention (Wan / diffusers ``FlowMatchEulerDiscreteScheduler``): a timestep ``t`` in
[0, 1000] has noise level ``s = t / 1000``; ``x_t = (1 - s) x0 + s eps``; the network
predicts the velocity ``v = eps - x0``, so ``x0 = x_t - s v`` and ``eps = x_t + (1 - s) v``.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(s: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Timestep shift (SD3 eq. 23): s' = shift * s / (1 + (shift - 1) * s)."""
    return shift * s / (1 + (shift - 1) * s)


def sigma_of(t: torch.Tensor | float) -> torch.Tensor | float:
    """Noise level of timestep ``t`` in [0, 1000]."""
    return t / NUM_TRAIN_TIMESTEPS


def _bcast(s: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(s, torch.Tensor) and s.dim() == 1 and like.dim() > 1:
        return s.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)
    return s


def add_noise(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - s) x0 + s eps; ``s`` scalar or per sample ``[B]``."""
    s = _bcast(s, x0)
    return (1 - s) * x0 + s * eps


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t - s v."""
    return x_t - _bcast(s, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """eps = x_t + (1 - s) v."""
    return x_t + (1 - _bcast(s, x_t)) * v


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching regression target v = eps - x0."""
    return eps - x0
