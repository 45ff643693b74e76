"""VSA fine stage on PyTorch FlexAttention.

The selection becomes a ``BlockMask`` (one block per tile, ``slots`` tokens) whose
``mask_mod`` hides each tile's padded keys. On CUDA ``flex_attention`` is compiled once per
process and the backward recomputes the forward under autograd; on CPU FlexAttention runs
its eager reference and has no backward here (use ``backend="torch"`` to train on CPU).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch < 2.9 returns lse through return_lse=True
    AuxRequest = None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _block_mask(idx: torch.Tensor, counts: torch.Tensor, slots: int, seq: int) -> BlockMask:
    B, H, N, K = idx.shape
    counts = counts.to(idx.device).long()
    # The blocks are a sparsity hint; the mask itself must say which tiles are selected
    # (the eager path evaluates only mask_mod).
    chosen = torch.zeros(B, H, N, N, dtype=torch.bool, device=idx.device)  # [B, H, Nq, Nk]
    chosen.scatter_(-1, idx.long(), True)

    def valid_key(b, h, q_idx, kv_idx):  # selected tile, and not a padded slot of it
        kv_tile = kv_idx // slots
        return chosen[b, h, q_idx // slots, kv_tile] & ((kv_idx % slots) < counts[kv_tile])

    num = torch.full((B, H, N), K, dtype=torch.int32, device=idx.device)  # [B, H, N]
    # FlexAttention wants one index column per KV block; entries past ``num`` are ignored.
    cols = torch.zeros(B, H, N, N, dtype=torch.int32, device=idx.device)  # [B, H, N, N]
    cols[..., :K] = idx
    return BlockMask.from_kv_blocks(
        num,
        cols,
        BLOCK_SIZE=slots,
        mask_mod=valid_key,
        seq_lengths=(seq, seq),
    )


def _attend(q_t, k_t, v_t, idx, counts, slots, scale):
    mask = _block_mask(idx, counts, slots, q_t.shape[-2])
    fn = _compiled_flex() if q_t.is_cuda else flex_attention
    if AuxRequest is None:  # torch < 2.9
        return fn(q_t, k_t, v_t, block_mask=mask, scale=scale, return_lse=True)
    out, aux = fn(q_t, k_t, v_t, block_mask=mask, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def fine_forward(q_t, k_t, v_t, idx, counts, slots, scale):
    # Autograd is VSAFineFunction's: flex must not see requires_grad (CPU refuses it).
    out, lse = _attend(q_t.detach(), k_t.detach(), v_t.detach(), idx, counts, slots, scale)
    # the op's contract (and fake): float64 lse for float64 inputs, else float32
    return out.to(q_t.dtype), lse.to(torch.float64 if q_t.dtype == torch.float64 else torch.float32)


def fine_backward(do, q_t, k_t, v_t, out, lse, idx, counts, slots, scale):
    if not q_t.is_cuda:
        raise ValueError(
            "backend='flex' has no backward on CPU; use backend='torch' (or 'triton' on a "
            "GPU) to train"
        )
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q_t, k_t, v_t)]
        o, _ = _attend(*leaves, idx, counts, slots, scale)
        return torch.autograd.grad(o, leaves, do)
