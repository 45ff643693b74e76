"""Exponential moving average (EMA) of a module's trainable parameters.

``shadow <- decay * shadow + (1 - decay) * param`` after each optimizer step (Polyak
averaging). The shadow is kept in float32 (float64 for float64 parameters) whatever the
parameters' dtype, so bf16 weights do not round the average away. Parameters are tracked
by name and the module is passed to every call, so the EMA survives wrapping that
replaces ``Parameter`` objects (FSDP2 ``fully_shard`` turns them into DTensors: build the
EMA after wrapping and the shadows are DTensors with the same sharding). It is a Stateful
(``state_dict`` / ``load_state_dict``), checkpointed and resharded by DCP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["EMA"]


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class EMA:
    """EMA of ``module``'s parameters that require grad.

    Args:
        module: the network whose weights are averaged (the shadow starts as a copy).
        decay: in (0, 1); e.g. 0.999 averages over ~1000 steps.
        names: only these parameters (e.g. one LoRA adapter of a base that carries two);
            default: every parameter that requires grad.
    """

    def __init__(self, module: torch.nn.Module, decay: float, names: Iterable[str] | None = None):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), e.g. 0.999; got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        wanted = None if names is None else set(names)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.requires_grad if wanted is None else name in wanted:
                    self.shadow[name] = p.detach().clone().to(_shadow_dtype(p.dtype))
        if not self.shadow:
            raise ValueError("module has no parameters that require grad; nothing to average")

    def _params(self, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = {n: p for n, p in module.named_parameters() if n in self.shadow}
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ValueError(
                f"module lacks {len(missing)} averaged parameter(s), e.g. {missing[:3]}; "
                "pass the module the EMA was built from"
            )
        return params

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float | None = None) -> None:
        """One EMA step towards ``module``'s current parameters (call after optimizer.step)."""
        d = self.decay if decay is None else float(decay)
        if not 0 <= d <= 1:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        for name, p in self._params(module).items():
            s = self.shadow[name]
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)  # s + (1 - d) (p - s)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self, module: torch.nn.Module) -> None:
        """Restart the average at ``module``'s current weights (e.g. at ``ema_start_step``)."""
        for name, p in self._params(module).items():
            self.shadow[name].copy_(p.detach())
        self.num_updates = 0

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the EMA weights into ``module`` (permanently; e.g. before export)."""
        for name, p in self._params(module).items():
            p.copy_(self.shadow[name].to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily run ``module`` with the EMA weights; the live weights come back after.

        >>> with ema.swapped_in(model):
        ...     validate(model)
        """
        params = self._params(module)
        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in params.items()}
            for name, p in params.items():
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        """``decay``, ``num_updates`` and the ``shadow`` tensors themselves (not copies, like
        ``nn.Module.state_dict``): the EMA is a Stateful piece of a DCP checkpoint
        (:mod:`fastwan.train.checkpoint`), which saves the (sharded) shadows as they are and
        loads into them in place."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (the shadows are copied in place)."""
        for key in ("decay", "num_updates", "shadow"):
            if key not in state:
                raise ValueError(f"EMA state lacks {key!r}; expected a dict from EMA.state_dict()")
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the module: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}; load a state saved from the same network"
            )
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA state for {name!r} has shape {tuple(t.shape)}, expected "
                    f"{tuple(self.shadow[name].shape)}"
                )
        with torch.no_grad():
            for name, t in shadow.items():
                if t is not self.shadow[name]:  # DCP loaded into the shadow itself
                    self.shadow[name].copy_(t)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
