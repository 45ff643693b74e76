"""Block-gather VSA fine stage in pure PyTorch: any device, forward and backward.

Each query tile attends to the tokens of its ``k`` selected key tiles. Query tiles are
processed in chunks so that the gathered keys/values of a long sequence are never all
materialised at once; the backward recomputes scores from the saved log-sum-exp, as flash
attention does, so memory stays bounded by one chunk.

Layout (shared by every fine-stage backend):
  q_t, k_t, v_t: [B, H, N * slots, D] tiled (see ``tiling.TilePlan``)
  idx:           [B, H, N, k] int, selected key tiles per query tile
  counts:        [N] int32, valid tokens per tile (keys beyond are masked)
  out:           [B, H, N * slots, D];  lse: [B, H, N * slots] float32
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 96 * 2**20


def _chunk_tiles(bh: int, n: int, k: int, slots: int, d: int, budget: int) -> int:
    # fp32 bytes per query tile: scores (+ probs) and gathered K and V.
    per_tile = bh * 4 * (2 * slots * k * slots + 2 * k * slots * d + 2 * slots * d)
    return max(1, min(n, budget // max(per_tile, 1)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax in float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(q_t, k_t, idx, counts, slots):
    B, H, Sp, D = q_t.shape
    N = Sp // slots
    K = idx.shape[-1]
    BH = B * H
    idx = idx.reshape(BH, N, K).long()
    flat = idx + (torch.arange(BH, device=q_t.device) * N).view(BH, 1, 1)  # into BH * N tiles
    key_ok = torch.arange(slots, device=q_t.device).view(1, slots) < counts.view(N, 1).long()
    bias = torch.zeros(N, slots, device=q_t.device, dtype=_acc_dtype(q_t.dtype))
    bias.masked_fill_(~key_ok, float("-inf"))  # [N, slots]
    return B, H, N, K, D, BH, idx, flat, bias


def fine_forward(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    slots: int,
    scale: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, K, D, BH, idx_l, flat, bias = _prepare(q_t, k_t, idx, counts, slots)
    qb = q_t.reshape(BH, N, slots, D)
    kb = k_t.reshape(BH * N, slots, D)
    vb = v_t.reshape(BH * N, slots, D)
    out = torch.empty(BH, N, slots, D, device=q_t.device, dtype=q_t.dtype)
    acc = _acc_dtype(q_t.dtype)
    lse = torch.empty(BH, N, slots, device=q_t.device, dtype=acc)
    c = _chunk_tiles(BH, N, K, slots, D, chunk_bytes)
    for n0 in range(0, N, c):
        n1 = min(N, n0 + c)
        m = BH * (n1 - n0)
        sel = flat[:, n0:n1]  # [BH, c, K]
        ks = kb[sel].reshape(m, K * slots, D)
        vs = vb[sel].reshape(m, K * slots, D)
        kbias = bias[idx_l[:, n0:n1]].reshape(m, 1, K * slots)
        q = qb[:, n0:n1].reshape(m, slots, D)
        s = torch.baddbmm(kbias, q.to(acc), ks.to(acc).transpose(1, 2), alpha=scale)
        # A chunk holds whole rows, so normalise exactly rather than through exp(s - lse):
        # an lse rounded at |s| ~ 1e3 scales a row of P by (1 + 1e-4), which dS amplifies.
        lse_c = torch.logsumexp(s, dim=-1)  # [m, slots]
        p = torch.softmax(s, dim=-1)
        o = torch.bmm(p.to(vs.dtype) if vs.dtype != torch.float64 else p, vs)
        out[:, n0:n1] = o.view(BH, n1 - n0, slots, D).to(out.dtype)
        lse[:, n0:n1] = lse_c.view(BH, n1 - n0, slots)
    return out.view(B, H, N * slots, D), lse.view(B, H, N * slots)


def fine_backward(
    do: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    slots: int,
    scale: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, K, D, BH, idx_l, flat, bias = _prepare(q_t, k_t, idx, counts, slots)
    qb = q_t.reshape(BH, N, slots, D)
    kb = k_t.reshape(BH * N, slots, D)
    vb = v_t.reshape(BH * N, slots, D)
    dob = do.reshape(BH, N, slots, D)
    acc = _acc_dtype(q_t.dtype)
    dq = torch.empty(BH, N, slots, D, device=q_t.device, dtype=acc)
    dk = torch.zeros(BH * N, slots, D, device=q_t.device, dtype=acc)
    dv = torch.zeros(BH * N, slots, D, device=q_t.device, dtype=acc)
    c = _chunk_tiles(BH, N, K, slots, D, chunk_bytes // 2)
    for n0 in range(0, N, c):
        n1 = min(N, n0 + c)
        m = BH * (n1 - n0)
        sel = flat[:, n0:n1]
        ks = kb[sel].reshape(m, K * slots, D).to(acc)
        vs = vb[sel].reshape(m, K * slots, D).to(acc)
        kbias = bias[idx_l[:, n0:n1]].reshape(m, 1, K * slots)
        q = qb[:, n0:n1].reshape(m, slots, D).to(acc)
        g = dob[:, n0:n1].reshape(m, slots, D).to(acc)
        s = torch.baddbmm(kbias, q, ks.transpose(1, 2), alpha=scale)
        p = torch.softmax(s, dim=-1)  # [m, slots, K * slots], exact rows (see forward)
        dv_sel = torch.bmm(p.transpose(1, 2), g)  # [m, K * slots, D]
        dp = torch.bmm(g, vs.transpose(1, 2))
        # rowsum(P * dP) from the recomputed P: equal to rowsum(dO * O) but free of O's
        # rounding, which matters for low-precision outputs and peaked softmax.
        delta = (p * dp).sum(-1, keepdim=True)
        ds = p.mul_(dp.sub_(delta))
        dq[:, n0:n1] = torch.bmm(ds, ks).mul_(scale).view(BH, n1 - n0, slots, D)
        dk_sel = torch.bmm(ds.transpose(1, 2), q).mul_(scale)
        rows = sel.reshape(-1)
        dk.index_add_(0, rows, dk_sel.view(m * K, slots, D))
        dv.index_add_(0, rows, dv_sel.view(m * K, slots, D))
    shape = (B, H, N * slots, D)
    return (
        dq.view(shape).to(q_t.dtype),
        dk.view(shape).to(k_t.dtype),
        dv.view(shape).to(v_t.dtype),
    )
