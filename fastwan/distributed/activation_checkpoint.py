"""Activation checkpointing per Wan block (``parallel.activation_checkpointing``).

* ``none``: every activation is kept for backward.
* ``full``: a block keeps only its inputs; backward runs the block's forward again.
* ``selective``: like ``full``, but the outputs of the attention kernels (dense SDPA and
  VSA's fine stage) are kept and not recomputed: attention is the costly part of a long
  video sequence, its output is small ([B, S, H, D]), everything else (projections,
  norms, FFN) is recomputed.

Implemented with non-reentrant :func:`torch.utils.checkpoint.checkpoint` (``selective``
through its ``context_fn`` and a :class:`~torch.utils.checkpoint.CheckpointPolicy`). The
block's own ``forward`` is replaced on the instance, not wrapped in another module, so
parameter names, state-dict keys, EMA names and checkpoints stay exactly as they were, and
``fully_shard`` applied afterwards wraps the checkpointed block (torchtitan's order).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from fastwan.choices import CHECKPOINT_MODES

__all__ = [
    "activation_checkpointing_mode",
    "apply_activation_checkpointing",
    "attention_ops",
]

_MODE_ATTR = "_fastwan_ac_mode"
_FASTWAN_NAMESPACE = "fastwan"  # VSA's custom ops (fastwan::vsa_fine_fwd, ...)


@functools.cache
def attention_ops() -> frozenset:
    """The aten attention kernels whose outputs ``selective`` keeps (those this torch has)."""
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    ops = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.add(packet.default)
    return frozenset(ops)


def _keep_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    del ctx, args, kwargs
    if op in attention_ops() or getattr(op, "namespace", None) == _FASTWAN_NAMESPACE:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_attention)


def _checkpointed_forward(self: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    mode = getattr(self, _MODE_ATTR)
    if not torch.is_grad_enabled():  # inference / no-grad rollouts: nothing to save
        return forward(self, *args, **kwargs)
    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    return checkpoint(forward, self, *args, use_reentrant=False, **extra, **kwargs)


def _blocks(net: nn.Module) -> nn.ModuleList:
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"expected a Wan transformer with a `blocks` ModuleList, got {type(net).__name__}"
        )
    return blocks


def apply_activation_checkpointing(net: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` (``none`` / ``full`` / ``selective``) on every block of the Wan
    transformer ``net`` (in place; returned). Applying again switches the mode."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(
            f"parallel.activation_checkpointing must be one of {CHECKPOINT_MODES}; got {mode!r}"
        )
    for block in _blocks(net):
        if mode == "none":
            block.__dict__.pop("forward", None)
            block.__dict__.pop(_MODE_ATTR, None)
        else:
            setattr(block, _MODE_ATTR, mode)
            # An instance attribute shadows the class's forward (FSDP2's subclass keeps
            # it); deepcopy rebinds the partial to the copy. The class's forward is
            # captured here, not looked up per call: torch.compile cannot trace that.
            forward = block.__dict__.get("forward")
            fn = forward.args[1] if isinstance(forward, functools.partial) else type(block).forward
            block.forward = functools.partial(_checkpointed_forward, block, fn)
    return net


def activation_checkpointing_mode(net: nn.Module) -> str:
    """The mode :func:`apply_activation_checkpointing` set on ``net``'s blocks."""
    return getattr(_blocks(net)[0], _MODE_ATTR, "none")
