"""Activation checkpointing per Wan block: the same numbers, and real recomputation.

A tiny Wan (2 blocks; dense and VSA self-attention) runs forward + backward under a
dispatch mode that counts the aten / fastwan ops executed, and a forward hook counts the
FFN calls of every block. ``full`` runs each block's forward twice (attention included);
``selective`` runs the FFN twice but each attention kernel once (its output is kept).
Gradients must equal the un-checkpointed ones exactly (same ops on the same inputs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_wan import TEXT_DIM, tiny_transformer
from torch.utils._python_dispatch import TorchDispatchMode

from fastwan.distributed.activation_checkpoint import (
    activation_checkpointing_mode,
    apply_activation_checkpointing,
    attention_ops,
)
from fastwan.models import set_attention


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _attention_calls(counts: dict[str, int]) -> int:
    names = {str(op) for op in attention_ops()} | {"fastwan.vsa_fine_fwd.default"}
    return sum(n for op, n in counts.items() if op in names)


@pytest.fixture(scope="module")
def base():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tiny_transformer(num_layers=2).float().train()


def _run(net: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """Grads, op counts and FFN calls of one forward + backward on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)  # [B, C, T, H, W]: token grid (2, 4, 4)
    cond = torch.randn(1, 16, TEXT_DIM, generator=g)  # [B, L, dim]
    t = torch.tensor([500.0])  # [B]
    ffn_calls = [0]
    hooks = [
        b.ffn.register_forward_hook(lambda *_: ffn_calls.__setitem__(0, ffn_calls[0] + 1))
        for b in net.blocks
    ]
    net.zero_grad(set_to_none=True)
    with _OpCounter() as counter:
        out = net(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
        out.square().mean().backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return grads, counter.counts, ffn_calls[0]


@pytest.mark.parametrize("attention", ["dense", "vsa"])
def test_checkpointing_same_grads_and_recomputes(base, attention):
    results = {}
    for mode in ("none", "full", "selective"):
        net = copy.deepcopy(base)
        if attention == "vsa":
            set_attention(net, "vsa", sparsity=0.5, tile_size=(1, 2, 2), backend="torch")
        apply_activation_checkpointing(net, mode)
        assert activation_checkpointing_mode(net) == mode
        results[mode] = _run(net)
    grads0, counts0, ffn0 = results["none"]
    blocks = len(base.blocks)
    assert ffn0 == blocks
    # self- and cross-attention kernels per block (VSA's fine stage replaces self-attention)
    attn0 = _attention_calls(counts0)
    assert attn0 == 2 * blocks
    for mode in ("full", "selective"):
        grads, counts, ffn = results[mode]
        assert grads.keys() == grads0.keys() and len(grads) > 0
        # Bitwise equal by construction: non-reentrant checkpointing keeps the autograd
        # graph and recomputes the saved tensors with the same kernels on the same inputs
        # (same shapes, process and thread count), so every sum runs in the same order.
        for name in grads0:
            assert torch.equal(grads[name], grads0[name]), (mode, name)
        assert ffn == 2 * blocks, f"{mode}: every block's FFN must run again in backward"
        expected_attn = 2 * attn0 if mode == "full" else attn0
        assert _attention_calls(counts) == expected_attn, (mode, counts)
        # the recomputed forward adds matmuls beyond the un-checkpointed run
        assert counts["aten.addmm.default"] > counts0["aten.addmm.default"]


def test_checkpointing_keeps_names_and_switches_off(base):
    net = copy.deepcopy(base)
    names = [n for n, _ in net.named_parameters()]
    keys = list(net.state_dict())
    apply_activation_checkpointing(net, "full")
    assert [n for n, _ in net.named_parameters()] == names  # no wrapper module in the names
    assert list(net.state_dict()) == keys
    clone = copy.deepcopy(net)  # the copy's blocks checkpoint themselves, not the original's
    assert clone.blocks[0].forward.args[0] is clone.blocks[0]
    apply_activation_checkpointing(net, "none")
    assert activation_checkpointing_mode(net) == "none"
    assert _run(net)[2] == len(net.blocks)  # no recompute any more
    # no grad (rollouts, teacher): plain forward, no checkpoint
    apply_activation_checkpointing(net, "full")
    with torch.no_grad(), _OpCounter() as counter:
        net(
            hidden_states=torch.zeros(1, 16, 2, 8, 8),
            timestep=torch.tensor([10.0]),
            encoder_hidden_states=torch.zeros(1, 4, TEXT_DIM),
            return_dict=False,
        )
    assert _attention_calls(counter.counts) == 2 * len(net.blocks)


def test_bad_mode_is_refused(base):
    with pytest.raises(ValueError, match="parallel.activation_checkpointing must be one of"):
        apply_activation_checkpointing(copy.deepcopy(base), "partial")
    with pytest.raises(ValueError, match="blocks"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "full")
