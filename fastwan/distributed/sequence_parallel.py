"""Ulysses sequence parallelism for diffusers' Wan transformer (dense and VSA attention).

Every rank of a sequence-parallel (SP) group receives the same full inputs (latents,
timesteps, text embeddings). :func:`enable_sequence_parallel` adds hooks to the model, no
copy of diffusers' code:

* ``patch_embedding`` (forward hook): the token sequence ``[B, S, dim]`` is padded to a
  multiple of the SP size and this rank keeps its contiguous shard of ``S_loc`` tokens;
* ``rope`` (forward hook): cos / sin ``[1, S, 1, D]`` split the same way, so the rotary
  embedding of every local token matches its position in the full grid;
* ``condition_embedder`` (forward hook): per-token timestep embeddings (Wan2.2 TI2V,
  ``[B, S, ...]``) split the same way; per-sample ones (Wan2.1) are shared as they are;
* self-attention: fastwan's processor (:class:`fastwan.models.vsa.WanVSAAttnProcessor`)
  computes q, k, v (and the VSA gate) on the local tokens, then one all-to-all turns
  sequence shards into head shards (``[B, S, H / sp, D]``: the FULL sequence for a subset
  of heads), dense attention or VSA (which tiles the full token grid) runs, and the
  inverse all-to-all brings the output back to sequence shards. Padding tokens are cut
  off before attention and re-added after, so they never act as keys;
* cross-attention, FFN, norms and the output projection run on the local tokens (all are
  per-token);
* ``proj_out`` (forward hook): its output ``[B, S_loc, C * p]`` is all-gathered and the
  padding trimmed, so every rank returns the same full prediction. Gathering after the
  projection rather than before it moves ``dim / (C * p)`` (24x for Wan2.1) fewer bytes and
  keeps the rule for gradients below a single one.

Gradients (the contract with the trainer and FSDP). The loss must be the same on every
rank of an SP group (same data, timesteps and noise; the gathered output is the same).
Then:

* the gather's backward hands each rank the gradient of its own tokens, so every
  parameter's ``.grad`` on an SP rank holds the contribution of that rank's sequence shard
  only. The model's gradient is the **SUM over the SP group** of the ranks' ``.grad``
  (:func:`reduce_sequence_parallel_grads` does this for modules not wrapped by FSDP).
  Under FSDP2 sharding over ``shard x sp`` ranks (fastwan's mesh), whose reduce-scatter
  averages over all ``replicate x shard x sp`` ranks, divide by the data-parallel size
  ``replicate x shard`` instead: ``fsdp_module.set_gradient_divide_factor(replicate *
  shard)`` (or multiply the loss by ``sp``), which averages over data-parallel ranks and
  sums over SP ranks;
* input gradients (latents, text embeddings that require grad) are complete: an identity
  whose backward all-reduces (sum) is put in front of the model, so every SP rank gets the
  full ``d loss / d input`` and models can be chained.

The context is shared with ``copy.deepcopy`` copies of the model (an EMA copy runs SP on
the same group). Like the VSA grid, the token count of the forward in flight is recorded
by a forward pre-hook, so activation checkpointing must recompute a block before the same
model runs a forward at another clip size (training uses one clip size).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastwan.models.vsa import (
    WanVSAAttnProcessor,
    set_attention,
    set_sequence_parallel,
    transformer_blocks,
)

__all__ = [
    "SequenceParallel",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "get_sequence_parallel",
    "reduce_sequence_parallel_grads",
]

_SP_ATTR = "_fastwan_sp"
# Float inputs of diffusers' forward that may require grad, with their positions.
_GRAD_INPUTS = (
    (0, "hidden_states"),
    (2, "encoder_hidden_states"),
    (3, "encoder_hidden_states_image"),
)


# ---------------------------------------------------------------------- raw collectives


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-to-all over dim 0 (``[sp, ...]``): chunk j goes to rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """``[B, S_loc, N, H, D]`` (sequence shard, all heads) -> ``[B, S_pad, N, H/sp, D]``."""
    if size == 1:
        return x
    x = x.unflatten(-2, (size, -1))  # [B, S_loc, N, sp, H_loc, D]
    x = _all_to_all(x.movedim(3, 0), group)  # [sp (source = sequence shard), B, S_loc, N, H_loc, D]
    return x.movedim(0, 1).flatten(1, 2)  # [B, S_pad, N, H_loc, D]


def _heads_to_seq(x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """``[B, S_pad, N, H/sp, D]`` (all tokens, head shard) -> ``[B, S_loc, N, H, D]``."""
    if size == 1:
        return x
    x = x.unflatten(1, (size, -1))  # [B, sp, S_loc, N, H_loc, D]
    x = _all_to_all(x.movedim(1, 0), group)  # [sp (source = head shard), B, S_loc, N, H_loc, D]
    return x.movedim(0, -3).flatten(-3, -2)  # [B, S_loc, N, H, D]


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
        ctx.size, ctx.group = size, group
        return _seq_to_heads(x, size, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_seq(grad, ctx.size, ctx.group), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
        ctx.size, ctx.group = size, group
        return _heads_to_seq(x, size, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _seq_to_heads(grad, ctx.size, ctx.group), None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather of sequence shards ``[B, S_loc, ...]`` -> ``[B, S_pad, ...]``.

    Backward: this rank's slice of the output gradient, without communication. The loss is
    the same on every SP rank, so the output gradient is too, and the slice is exactly the
    gradient of this rank's tokens."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, size: int, group: Any) -> torch.Tensor:
        ctx.rank, ctx.local = rank, x.shape[1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(1, ctx.rank * ctx.local, ctx.local), None, None, None


class _CompleteInputGrad(torch.autograd.Function):
    """Identity whose backward sums the gradient over the SP group: each rank's model
    only back-propagates through its own tokens, the sum is the full input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


# ------------------------------------------------------------------------------ context


class SequenceParallel:
    """The SP state of one transformer: its group, and the token count ``seq_len`` of the
    forward in flight (recorded by the transformer's forward pre-hook)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seq_len: int | None = None

    def __deepcopy__(self, memo: dict) -> SequenceParallel:
        # A process group cannot be copied; a copied model runs SP on the same group.
        return self

    @property
    def padded_len(self) -> int:
        if self.seq_len is None:
            raise ValueError(
                "sequence parallelism does not know the token count: call the transformer "
                "itself (its forward pre-hook records it from the latent shape)"
            )
        return math.ceil(self.seq_len / self.size) * self.size

    @property
    def local_len(self) -> int:
        return self.padded_len // self.size

    def _pad(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Zero-pad ``dim`` from ``seq_len`` to ``padded_len`` tokens."""
        missing = self.padded_len - x.shape[dim]
        if missing == 0:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat((x, x.new_zeros(shape)), dim=dim)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous token shard of a full sequence along ``dim``."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(
                f"sequence parallelism expected {self.seq_len} tokens on dim {dim}, got shape "
                f"{tuple(x.shape)}"
            )
        return self._pad(x, dim).narrow(dim, self.rank * self.local_len, self.local_len)

    def seq_to_heads(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sequence shards ``[B, S_loc, H, D]`` -> the full sequence for this rank's heads
        ``[B, S, H / sp, D]`` (padding removed), one all-to-all for all tensors."""
        stacked = torch.stack(xs, dim=2)  # [B, S_loc, N, H, D]
        full = _SeqToHeads.apply(stacked, self.size, self.group)  # [B, S_pad, N, H_loc, D]
        return full[:, : self.seq_len].unbind(2)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`seq_to_heads`: ``[B, S, H / sp, D]`` -> ``[B, S_loc, H, D]``."""
        x = self._pad(x, 1).unsqueeze(2)  # [B, S_pad, 1, H_loc, D]
        return _HeadsToSeq.apply(x, self.size, self.group).squeeze(2)  # [B, S_loc, H, D]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence shards ``[B, S_loc, ...]`` -> the full ``[B, S, ...]`` on every rank."""
        if self.size == 1:
            return x[:, : self.seq_len]
        full = _GatherSequence.apply(x, self.rank, self.size, self.group)  # [B, S_pad, ...]
        return full[:, : self.seq_len]

    def complete_input_grad(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1 or not (torch.is_grad_enabled() and x.requires_grad):
            return x
        return _CompleteInputGrad.apply(x, self.group)


# -------------------------------------------------------------------------------- hooks


def _before_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Transformer pre-hook: record the token count; make input gradients complete."""
    sp: SequenceParallel = getattr(module, _SP_ATTR)
    args, kwargs = list(args), dict(kwargs)
    latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B,C,T,H,W]
    if latents.dim() != 5:
        raise ValueError(f"hidden_states must be [B, C, T, H, W], got {tuple(latents.shape)}")
    p_t, p_h, p_w = module.config.patch_size
    T, H, W = latents.shape[2:]
    sp.seq_len = (T // p_t) * (H // p_h) * (W // p_w)
    for pos, name in _GRAD_INPUTS:
        if name in kwargs:
            if isinstance(kwargs[name], torch.Tensor):
                kwargs[name] = sp.complete_input_grad(kwargs[name])
        elif pos < len(args) and isinstance(args[pos], torch.Tensor):
            args[pos] = sp.complete_input_grad(args[pos])
    return tuple(args), kwargs


def _split_patches(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """``patch_embedding`` hook: ``[B, dim, T, H, W]`` -> this rank's tokens, shaped
    ``[B, dim, 1, 1, S_loc]`` so that the model's ``flatten(2).transpose(1, 2)`` yields
    ``[B, S_loc, dim]``."""
    sp: SequenceParallel = getattr(module, _SP_ATTR)
    local = sp.shard(output.flatten(2), dim=2)  # [B, dim, S_loc]
    return local.unsqueeze(2).unsqueeze(2)  # [B, dim, 1, 1, S_loc]


def _split_rope(module: nn.Module, args: tuple, output: tuple) -> tuple:
    """``rope`` hook: cos, sin ``[1, S, 1, D]`` -> ``[1, S_loc, 1, D]``."""
    sp: SequenceParallel = getattr(module, _SP_ATTR)
    return tuple(sp.shard(x, dim=1) for x in output)


def _split_condition(module: nn.Module, args: tuple, output: tuple) -> tuple:
    """``condition_embedder`` hook: per-token time embeddings (Wan2.2 TI2V: ``temb [B, S,
    dim]``, ``timestep_proj [B, S, 6 dim]``) are split like the tokens."""
    temb, timestep_proj, *rest = output
    if timestep_proj.dim() != 3:  # [B, 6 dim]: one timestep per sample, shared
        return output
    sp: SequenceParallel = getattr(module, _SP_ATTR)
    return (sp.shard(temb, dim=1), sp.shard(timestep_proj, dim=1), *rest)


def _gather_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """``proj_out`` hook: ``[B, S_loc, C p]`` -> ``[B, S, C p]`` on every rank."""
    sp: SequenceParallel = getattr(module, _SP_ATTR)
    return sp.gather(output)


_FORWARD_HOOKS = {
    "patch_embedding": _split_patches,
    "rope": _split_rope,
    "condition_embedder": _split_condition,
    "proj_out": _gather_output,
}


# --------------------------------------------------------------------------- public API


def get_sequence_parallel(transformer: nn.Module) -> SequenceParallel | None:
    """The transformer's SP context, or ``None`` when SP is off."""
    return getattr(transformer, _SP_ATTR, None)


def enable_sequence_parallel(transformer: nn.Module, group: Any) -> None:
    """Run a diffusers ``WanTransformer3DModel`` with Ulysses sequence parallelism over
    ``group`` (a ``torch.distributed`` process group, e.g. ``mesh["sp"].get_group()``).

    Every rank of ``group`` must call the model with the same inputs and compute the same
    loss; parameter gradients are then per-shard contributions to be SUMMED over the group
    (see the module docstring). Self-attention gets fastwan's processor (dense, and gates
    added, zero, if the model has none) unless it has one already; VSA / dense can be
    switched afterwards with :func:`fastwan.models.vsa.set_attention`.

    Raises ``ValueError`` when the head count does not divide by the group size.
    """
    blocks = transformer_blocks(transformer)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "sequence parallelism needs torch.distributed: call "
            "torch.distributed.init_process_group first (torchrun sets the environment)"
        )
    size = dist.get_world_size(group)
    heads = transformer.config.num_attention_heads
    if heads % size:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"num_attention_heads ({heads}) must be divisible by the sequence-parallel size "
            f"({size}); set parallel.sequence_parallel to one of {divisors}"
        )
    if get_sequence_parallel(transformer) is not None:
        disable_sequence_parallel(transformer)
    if not all(isinstance(b.attn1.processor, WanVSAAttnProcessor) for b in blocks):
        set_attention(transformer, "dense")
    sp = SequenceParallel(group)
    setattr(transformer, _SP_ATTR, sp)
    transformer.register_forward_pre_hook(_before_forward, with_kwargs=True)
    for name, hook in _FORWARD_HOOKS.items():
        module = getattr(transformer, name)
        setattr(module, _SP_ATTR, sp)
        module.register_forward_hook(hook)
    set_sequence_parallel(transformer, sp)  # the self-attention processors read it


def disable_sequence_parallel(transformer: nn.Module) -> None:
    """Undo :func:`enable_sequence_parallel` (no-op when SP is off)."""
    if get_sequence_parallel(transformer) is None:
        return
    _remove_hooks(transformer._forward_pre_hooks, _before_forward)
    delattr(transformer, _SP_ATTR)
    for name, hook in _FORWARD_HOOKS.items():
        module = getattr(transformer, name)
        _remove_hooks(module._forward_hooks, hook)
        if hasattr(module, _SP_ATTR):
            delattr(module, _SP_ATTR)
    set_sequence_parallel(transformer, None)


def _remove_hooks(hooks: dict, fn: Any) -> None:
    # Scan the hook dict (not saved handles): a deepcopy of the model has its own dicts.
    for key in [k for k, h in hooks.items() if h is fn]:
        del hooks[key]


@torch.no_grad()
def reduce_sequence_parallel_grads(
    module_or_params: nn.Module | list[nn.Parameter], group: Any
) -> None:
    """Sum every parameter gradient over the SP ``group`` (in place), for modules not
    wrapped by FSDP. A DTensor gradient (FSDP2 shard) is reduced through its local shard."""
    params = (
        module_or_params.parameters()
        if isinstance(module_or_params, nn.Module)
        else module_or_params
    )
    if dist.get_world_size(group) == 1:
        return
    works = []
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        works.append(dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group, async_op=True))
    for work in works:
        work.wait()
