"""VSA fine stage on PyTorch FlexAttention.

The selection becomes a ``BlockMask`` (one block per tile, ``slots`` tokens) whose
``mask_mod`` hides each tile's padded keys. On CUDA ``flex_attention`` is compiled once per
process and the backward recomputes the forward under autograd; on CPU FlexAttention runs
its eager reference and has no backward here (use ``backend="torch"`` to train on CPU).

Non-finite inputs (the rule of ``video_sparse_attention``: a nan or inf reaches only the
queries whose tile selected its tile) need three repairs around FlexAttention:
  * pad value slots are zeroed: the mask hides pad keys from the scores, but a pad holds a
    copy of a valid token, and its infinite value would reach ``P @ V`` through 0 * inf;
  * a row whose scores are all -inf gets nan, as a dense softmax gives (FlexAttention
    returns 0 for such rows, which it takes for fully masked ones; here every row has a
    valid key, so only infinite inputs produce them);
  * on CPU the eager reference multiplies the whole dense ``P`` by ``V``, so the non-finite
    values of unselected tiles leak through 0 * nan; they are left out of that product and
    put back for the selecting queries only (``reference.with_nonfinite_values``). The CUDA
    kernel never reads unselected blocks.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fastwan.attention.reference import with_nonfinite_values

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


def _valid_slots(counts: torch.Tensor, slots: int, device) -> torch.Tensor:
    """[N * slots] bool: the valid (non-pad) slots of the tiled layout."""
    counts = counts.to(device).long()
    return (torch.arange(slots, device=device) < counts.view(-1, 1)).view(-1)


def _attend(q_t, k_t, v_t, idx, counts, slots, scale):
    mask = _block_mask(idx, counts, slots, q_t.shape[-2])
    fn = _compiled_flex() if q_t.is_cuda else flex_attention
    if bool((counts < slots).any()):  # partial tiles: pads would give 0 * inf in P @ V
        pad = ~_valid_slots(counts, slots, q_t.device)
        v_t = v_t.masked_fill(pad.view(-1, 1), 0.0)
    if AuxRequest is None:  # torch < 2.9
        out, lse = fn(q_t, k_t, v_t, block_mask=mask, scale=scale, return_lse=True)
    else:
        out, aux = fn(q_t, k_t, v_t, block_mask=mask, scale=scale, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    # All scores -inf (infinite inputs only): nan, as a dense softmax, not flex's 0.
    return out.masked_fill((lse == float("-inf")).unsqueeze(-1), float("nan")), lse


def _eager_with_nonfinite_values(q_t, k_t, v_t, idx, counts, slots, scale):
    """The CPU path when ``v_t`` holds nan / inf: FlexAttention's eager reference on the
    finite part of ``v_t``, then the non-finite values put back for the queries that
    selected their tile (dense [B, H, N*slots, N*slots] probabilities, as eager flex
    materialises anyway)."""
    finite = torch.isfinite(v_t)
    out, lse = _attend(q_t, k_t, torch.where(finite, v_t, 0.0), idx, counts, slots, scale)
    B, H, N, _ = idx.shape
    chosen = torch.zeros(B, H, N, N, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, idx.long(), True)  # [B, H, N(q), N(k)]
    allowed = chosen.repeat_interleave(slots, 2).repeat_interleave(slots, 3)
    allowed &= _valid_slots(counts, slots, q_t.device)  # [B, H, N*slots, N*slots]
    acc = torch.float64 if q_t.dtype == torch.float64 else torch.float32
    s = (q_t.to(acc) @ k_t.to(acc).transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    out = with_nonfinite_values(out.to(acc), p, allowed, v_t.to(acc))
    return out.to(q_t.dtype), lse


def fine_forward(q_t, k_t, v_t, idx, counts, slots, scale):
    # Autograd is VSAFineFunction's: flex must not see requires_grad (CPU refuses it).
    q_t, k_t, v_t = q_t.detach(), k_t.detach(), v_t.detach()
    if not q_t.is_cuda and not bool(torch.isfinite(v_t).all()):
        out, lse = _eager_with_nonfinite_values(q_t, k_t, v_t, idx, counts, slots, scale)
    else:
        out, lse = _attend(q_t, k_t, v_t, idx, counts, slots, scale)
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
