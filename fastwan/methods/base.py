"""What a training method is to :class:`fastwan.train.trainer.Trainer`: the :class:`Method`
protocol.

A method owns its networks, its losses and its schedule: which of its optimizer *roles*
step on which training step, and in what order. The trainer builds one AdamW optimizer
and LR schedule per role (``optim.<role>``), feeds micro-batches and the one training
``rng``, and never asks which method it runs. One trainer step, with ``step`` = the
steps completed before it::

    method.set_step(step)
    batches = the next train.gradient_accumulation_steps micro-batches
    for role in method.updates(step):  # in this order
        for batch in batches:
            loss, info = method.loss(role, batch, rng)  # accumulated
        clip role's gradients, step its optimizer and LR schedule (then the generator EMA)
    record["sparsity"] = method.sparsity

Every random draw of a loss comes from ``rng`` (a ``torch.Generator``; in DMD the
"generator" is the student network, so the word is kept for the role). The role
``"generator"`` is the network that is validated, exported and averaged (EMA).

Networks may be shared between roles (LoRA: the generator and the critic are two
adapters on one base module, which is also the frozen teacher). A method whose roles do
not train every parameter of their network says which they train, and a method whose
shared networks must be set up for a role before something outside its losses runs them
(validation) says how, with two optional members the trainer reads through
:func:`trained_parameters` and :func:`prepare_network`:

* ``trained_parameters(role) -> {name: parameter}``: what ``role``'s optimizer steps,
  its gradient clipping spans, its EMA averages and its checkpoint holds (names as in
  ``networks()[role]``); default: every parameter of the network that requires grad;
* ``prepare(role)``: configure ``networks()[role]`` to run as ``role`` (e.g. its adapter
  and attention); default: nothing to do.

Implementations: :class:`fastwan.methods.dmd.DMDMethod` (roles generator + critic, the
generator every ``dmd.generator_update_interval``-th step, before the critic),
:class:`fastwan.methods.flow.FlowMethod` (one role, every step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "METHOD_MEMBERS",
    "Method",
    "check_method",
    "prepare_network",
    "trained_parameters",
    "update_counts",
]


@runtime_checkable
class Method(Protocol):
    """A training method (see the module docstring for how the trainer drives it)."""

    #: The recipe's ``train.method``; written into every checkpoint.
    name: str
    #: The optimizer roles, each trained with its ``optim.<role>`` settings, e.g.
    #: ``("generator", "critic")``; ``networks()`` has exactly these keys.
    roles: tuple[str, ...]
    #: Set by :func:`fastwan.distributed.parallelize.parallelize_method` under FSDP CPU
    #: offload (the parameters stay on the CPU, the method computes here); else None.
    compute_device: torch.device | None

    @property
    def device(self) -> torch.device:
        """Where the method computes (and the trainer's ``rng`` draws)."""
        ...

    @property
    def sparsity(self) -> float:
        """The trained network's attention sparsity at the current step (0: dense); logged."""
        ...

    def networks(self) -> dict[str, nn.Module]:
        """The trainable networks by role."""
        ...

    def frozen_networks(self) -> dict[str, nn.Module]:
        """Networks the losses call but nothing trains (e.g. DMD's teacher), by name;
        parallelised (sharded, compiled) like the trainable ones."""
        ...

    def set_step(self, step: int) -> None:
        """Prepare for training step ``step`` (0-based; e.g. a sparsity schedule); called
        before every step and after a resume."""
        ...

    def updates(self, step: int) -> tuple[str, ...]:
        """The roles updated at training step ``step`` (0-based), in order. A pure function
        of ``step``: the trainer counts each role's updates over the run from it (the
        horizon of its LR schedule)."""
        ...

    def loss(
        self, role: str, batch: Mapping[str, Any], rng: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``role``'s scalar loss on one micro-batch (gradients only into ``role``'s
        network) and ``{name: float}`` to log (as ``<role>_<name>``); noise from ``rng``."""
        ...


METHOD_MEMBERS = (
    "name",
    "roles",
    "compute_device",
    "device",
    "sparsity",
    "networks",
    "frozen_networks",
    "set_step",
    "updates",
    "loss",
)


def check_method(method: object) -> None:
    """A ValueError naming what ``method`` lacks of the :class:`Method` protocol."""
    missing = [m for m in METHOD_MEMBERS if not hasattr(method, m)]
    if missing:
        raise ValueError(
            f"{type(method).__name__} is not a fastwan Method: it lacks "
            f"{', '.join(missing)} (see fastwan.methods.base.Method)"
        )


def update_counts(method: Method, steps: int) -> dict[str, int]:
    """How many times each role of ``method`` is updated in steps ``0 .. steps - 1``."""
    counts = dict.fromkeys(method.roles, 0)
    for step in range(steps):
        for role in method.updates(step):
            if role not in counts:
                raise ValueError(
                    f"{type(method).__name__}.updates({step}) names role {role!r}, which is "
                    f"not one of its roles {method.roles}"
                )
            counts[role] += 1
    return counts


def trained_parameters(method: Method, role: str) -> dict[str, nn.Parameter]:
    """The parameters ``role`` trains, by name in ``method.networks()[role]``: the
    method's ``trained_parameters(role)`` when it has one, else every parameter of the
    network that requires grad. A ValueError when there are none."""
    own = getattr(method, "trained_parameters", None)
    if own is not None:
        params = dict(own(role))
    else:
        net = method.networks()[role]
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"the {role} network has no trainable parameters")
    return params


def prepare_network(method: Method, role: str) -> nn.Module:
    """``method.networks()[role]``, set up to run as ``role`` (the method's ``prepare``,
    when it has one: a network shared between roles)."""
    prepare = getattr(method, "prepare", None)
    if prepare is not None:
        prepare(role)
    return method.networks()[role]
