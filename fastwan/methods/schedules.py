"""Learning-rate multipliers and the VSA sparsity schedule.

Steps are counted from 0 = "no optimizer step taken yet", which is what
``torch.optim.lr_scheduler.LambdaLR`` passes to its function (its ``last_epoch``: 0 at
construction, +1 per ``scheduler.step()``). So with ``scheduler.step()`` called after
every ``optimizer.step()``, optimizer update number ``n`` (1-based) uses
``lr * multiplier(n - 1)``.

Count each optimizer's steps separately: under ``dmd`` the generator steps once every
``dmd.generator_update_interval`` training steps, so its ``total_steps`` is
``ceil(train.max_steps / interval)`` when its scheduler steps with its own updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fastwan.config import OptimConfig, VSAConfig

__all__ = [
    "constant_multiplier",
    "cosine_multiplier",
    "lr_lambda",
    "make_lr_scheduler",
    "vsa_sparsity_at",
    "vsa_sparsity_from_config",
    "warmup_multiplier",
]


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def _check_warmup(warmup_steps: int) -> None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")


def constant_multiplier(step: int) -> float:
    """1 at every step."""
    _check_step(step)
    return 1.0


def warmup_multiplier(step: int, warmup_steps: int) -> float:
    """Linear warmup then constant: ``min(1, (step + 1) / warmup_steps)``.

    The first update uses ``lr / warmup_steps``, update ``warmup_steps`` (and all later
    ones) the full ``lr``; ``warmup_steps = 0`` is constant.
    """
    _check_step(step)
    _check_warmup(warmup_steps)
    if warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def cosine_multiplier(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Linear warmup, then cosine decay from 1 to ``min_lr_ratio``.

    For ``step < warmup_steps`` as :func:`warmup_multiplier`; then with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1]:
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi p)) / 2``, which is 1 at
    ``step = warmup_steps`` and ``min_lr_ratio`` from ``step = total_steps`` on.
    """
    _check_step(step)
    _check_warmup(warmup_steps)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps}); lower it"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier function of ``cfg.schedule`` for ``LambdaLR``.

    ``total_steps`` is the number of updates of *this* optimizer over the run (the cosine
    horizon; see the module docstring for the DMD generator).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if cfg.schedule == "constant":
        return constant_multiplier
    if cfg.schedule == "warmup":
        warmup = cfg.warmup_steps
        return lambda step: warmup_multiplier(step, warmup)
    if cfg.schedule == "cosine":
        warmup, ratio = cfg.warmup_steps, cfg.min_lr_ratio
        if warmup > total_steps:
            raise ValueError(
                f"warmup_steps ({warmup}) must be <= total_steps ({total_steps}) of the "
                "cosine schedule; lower optim.*.warmup_steps"
            )
        return lambda step: cosine_multiplier(step, warmup, total_steps, ratio)
    raise ValueError(f"schedule must be 'constant', 'warmup' or 'cosine', got {cfg.schedule!r}")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR(optimizer, lr_lambda(cfg, total_steps))``; its base lr is the optimizer's."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lr_lambda(cfg, total_steps))


def vsa_sparsity_at(
    step: int, target: float, decay_rate: float = 0.0, decay_interval: int = 1
) -> float:
    """VSA sparsity at training step ``step`` (0-based).

    Ramps from 0 to ``target`` in increments of ``decay_rate`` every ``decay_interval``
    steps: ``min(target, decay_rate * (step // decay_interval))``. ``decay_rate = 0``
    means no ramp (``target`` from step 0). Values within 1e-9 of ``target`` snap to it,
    so e.g. 30 increments of 0.03 give exactly 0.9 (float products fall just short).
    """
    _check_step(step)
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")
    if not 0.0 <= decay_rate <= 1.0:
        raise ValueError(f"decay_rate must be in [0, 1] (0 = no ramp), got {decay_rate!r}")
    if (
        isinstance(decay_interval, bool)
        or not isinstance(decay_interval, int)
        or (decay_interval < 1)
    ):
        raise ValueError(f"decay_interval must be a positive int, got {decay_interval!r}")
    if decay_rate == 0.0:
        return float(target)
    value = decay_rate * (step // decay_interval)
    return float(target) if value >= target - 1e-9 else float(value)


def vsa_sparsity_from_config(step: int, cfg: VSAConfig) -> float:
    """:func:`vsa_sparsity_at` with the fields of a :class:`VSAConfig` (0 when disabled)."""
    if not cfg.enabled:
        return 0.0
    return vsa_sparsity_at(step, cfg.sparsity, cfg.decay_rate, cfg.decay_interval)
