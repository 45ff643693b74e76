"""LoRA roles of the methods (recipe section ``lora``): which adapter a role trains on which
base, and with it the student's VSA gates.

An adapter is named after its role (``generator``, ``critic``). The base stays frozen;
the role's parameters are its adapter's and, for the generator of a VSA student, the gates
(``lora.gates``: ``lora`` -- a rank-``lora.rank`` adapter on each gate, part of the
generator's adapter -- or ``full``: the gate weights themselves, in the trainable dtype).
The gates are added (zero, where the base has none) before the adapters, so that a gate
adapter wraps them and the VSA processors see the wrapped gate.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fastwan.config import LoRAConfig
from fastwan.models.lora import adapter_parameters, add_adapter
from fastwan.models.vsa import GATE_NAME, add_vsa_gates

__all__ = [
    "GATE_PARAMETER",
    "attach_adapter",
    "freeze_except_adapters",
    "role_parameters",
    "trains_gates",
]

# A gate's own parameters (lora.gates: full), as named in the transformer.
GATE_PARAMETER = re.compile(rf"^blocks\.\d+\.{GATE_NAME}\.(weight|bias)$")


def trains_gates(lora: LoRAConfig, role: str, vsa_enabled: bool) -> str | None:
    """How ``role`` trains VSA gates: ``"lora"``, ``"full"`` or None (not at all: the
    critic, or a dense student)."""
    return lora.gates if role == "generator" and vsa_enabled else None


def attach_adapter(
    net: nn.Module,
    role: str,
    lora: LoRAConfig,
    *,
    vsa_enabled: bool,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> None:
    """Give the (frozen) base ``net`` the adapter of ``role`` in ``dtype``, seeded with
    ``seed``; for a VSA generator also its trainable gates."""
    gates = trains_gates(lora, role, vsa_enabled)
    add_vsa_gates(net)  # zero where the base has none; a gate adapter wraps them
    targets = list(lora.target_modules) + ([GATE_NAME] if gates == "lora" else [])
    add_adapter(
        net,
        role,
        rank=lora.rank,
        alpha=lora.alpha,
        target_modules=targets,
        dropout=lora.dropout,
        init=lora.init,
        dtype=dtype,
        seed=seed,
    )
    if gates == "full":
        for block in net.blocks:
            gate = getattr(block, GATE_NAME)
            if dtype is not None:
                gate.to(dtype=dtype)  # master weights in the trainable dtype
            gate.requires_grad_(True)


def role_parameters(
    net: nn.Module, role: str, lora: LoRAConfig, *, vsa_enabled: bool
) -> dict[str, nn.Parameter]:
    """What ``role`` trains on ``net``, by name, in the network's parameter order."""
    own = set(adapter_parameters(net, role))
    gates = trains_gates(lora, role, vsa_enabled) == "full"
    return {
        n: p
        for n, p in net.named_parameters()
        if n in own or (gates and GATE_PARAMETER.match(n) is not None)
    }


def freeze_except_adapters(nets: list[nn.Module], trained: list[dict[str, nn.Parameter]]) -> None:
    """Every parameter of ``nets`` frozen but those of ``trained`` (peft's injection marks
    only the adapter it injects trainable; the roles' parameters are set here at once)."""
    keep = {id(p) for params in trained for p in params.values()}
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(id(p) in keep)
