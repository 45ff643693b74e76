"""Block-gather VSA fine stage in pure PyTorch: any device, forward and backward.

Each query tile attends to the tokens of its ``k`` selected key tiles. Query tiles are
processed in chunks so that the gathered keys/values of a long sequence are never all
materialised at once. A chunk holds whole softmax rows, so both passes normalise rows
exactly (as dense attention does) instead of going through ``exp(s - lse)``: an lse
rounded at ``|s| ~ 1e3`` scales a whole row of P by ``1 + 1e-4``, which the backward's
``dS = P (dP - rowsum(P dP))`` cancellation amplifies.

Chunks are small (cache-sized) and reuse preallocated buffers: on CPU, fresh large
allocations cost page faults, and passes over cache-resident scores are cheap.

Layout (shared by every fine-stage backend):
  q_t, k_t, v_t: [B, H, N * slots, D] tiled (see ``tiling.TilePlan``)
  idx:           [B, H, N, k] int, selected key tiles per query tile
  counts:        [N] int32, valid tokens per tile (keys beyond are masked)
  out:           [B, H, N * slots, D];  lse: [B, H, N * slots] float32
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 16 * 2**20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax in float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Chunks:
    """Flattened query tiles (B * H * N rows), their selections and reusable buffers."""

    def __init__(self, q_t, idx, counts, slots, chunk_bytes, n_score_bufs, n_kv_bufs):
        B, H, Sp, D = q_t.shape
        self.shape = (B, H, Sp, D)
        self.N, self.K, self.D, self.slots = Sp // slots, idx.shape[-1], D, slots
        self.rows = B * H * self.N
        dev = q_t.device
        self.acc = _acc_dtype(q_t.dtype)
        # selected key tiles as rows of the flattened [B * H * N] tile axis
        bh_base = torch.arange(B * H, device=dev).repeat_interleave(self.N) * self.N
        self.sel = idx.reshape(self.rows, self.K).long() + bh_base.view(-1, 1)  # [rows, K]
        self.bias = None  # [N, slots] additive key mask, only when some tile is partial
        if bool((counts < slots).any()):
            ok = torch.arange(slots, device=dev).view(1, slots) < counts.view(-1, 1).long()
            self.bias = torch.zeros(self.N, slots, device=dev, dtype=self.acc)
            self.bias.masked_fill_(~ok, float("-inf"))
            self.key_tile = idx.reshape(self.rows, self.K).long()  # [rows, K] in [0, N)
        keys = self.K * slots
        esize = torch.finfo(self.acc).bits // 8
        per_row = esize * (n_score_bufs * slots * keys + n_kv_bufs * keys * D)
        self.chunk = max(1, min(self.rows, chunk_bytes // max(per_row, 1)))
        c = self.chunk
        self.score_bufs = [
            torch.empty(c, slots, keys, device=dev, dtype=self.acc) for _ in range(n_score_bufs)
        ]
        self.kv_bufs = [
            torch.empty(c * self.K, slots * D, device=dev, dtype=q_t.dtype)
            for _ in range(n_kv_bufs)
        ]
        self.cast_bufs = (
            [torch.empty(c, keys, D, device=dev, dtype=self.acc) for _ in range(n_kv_bufs)]
            if q_t.dtype != self.acc
            else None
        )

    def __iter__(self):
        for r0 in range(0, self.rows, self.chunk):
            yield r0, min(self.rows, r0 + self.chunk)

    def gather(self, x_tiles, r0, r1, i):
        """Selected key tiles of rows r0:r1 -> [r1 - r0, K * slots, D] in the acc dtype."""
        c = r1 - r0
        buf = self.kv_bufs[i][: c * self.K]
        torch.index_select(x_tiles, 0, self.sel[r0:r1].reshape(-1), out=buf)
        out = buf.view(c, self.K * self.slots, self.D)
        if self.cast_bufs is None:
            return out
        return self.cast_bufs[i][:c].copy_(out)

    def softmax_(self, q_scaled, ks, r0, r1, with_lse: bool):
        """Exact row softmax of ``q_scaled @ ks^T`` (q pre-multiplied by the softmax scale),
        in place in the score buffer.

        Returns P [c, slots, K * slots] and, if asked, the row log-sum-exp [c, slots]."""
        s = self.score_bufs[0][: r1 - r0]
        if self.bias is None:
            torch.bmm(q_scaled, ks.transpose(1, 2), out=s)
        else:
            kbias = self.bias[self.key_tile[r0:r1]].view(r1 - r0, 1, -1)
            torch.baddbmm(kbias, q_scaled, ks.transpose(1, 2), out=s)
        if not with_lse:  # one fused kernel, in place (row-wise, so aliasing is safe)
            return torch.ops.aten._softmax.out(s, -1, False, out=s), None
        # lse = s_j - log p_j at the row's largest score, where p_j >= 1 / keys is precise.
        row_max, arg = s.max(-1, keepdim=True)
        p = torch.ops.aten._softmax.out(s, -1, False, out=s)
        return p, (row_max - p.gather(-1, arg).log()).squeeze(-1)


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
    ch = _Chunks(q_t, idx, counts, slots, chunk_bytes, n_score_bufs=1, n_kv_bufs=2)
    B, H, Sp, D = ch.shape
    qb = q_t.reshape(ch.rows, slots, D)
    kb = k_t.reshape(ch.rows, slots * D)
    vb = v_t.reshape(ch.rows, slots * D)
    out = torch.empty(ch.rows, slots, D, device=q_t.device, dtype=ch.acc)
    lse = torch.empty(ch.rows, slots, device=q_t.device, dtype=ch.acc)
    for r0, r1 in ch:
        ks = ch.gather(kb, r0, r1, 0)  # [c, K * slots, D]
        vs = ch.gather(vb, r0, r1, 1)
        q = qb[r0:r1].to(ch.acc) * scale  # [c, slots, D], small: scaling q beats scaling S
        p, lse[r0:r1] = ch.softmax_(q, ks, r0, r1, with_lse=True)
        torch.bmm(p, vs, out=out[r0:r1])
    return out.view(B, H, Sp, D).to(q_t.dtype), lse.view(B, H, Sp)


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
    # out and lse are unused: rows are renormalised exactly (see the module docstring).
    ch = _Chunks(q_t, idx, counts, slots, chunk_bytes, n_score_bufs=2, n_kv_bufs=2)
    B, H, Sp, D = ch.shape
    c, K, acc, dev = ch.chunk, ch.K, ch.acc, q_t.device
    qb = q_t.reshape(ch.rows, slots, D)
    kb = k_t.reshape(ch.rows, slots * D)
    vb = v_t.reshape(ch.rows, slots * D)
    dob = do.reshape(ch.rows, slots, D)
    dq = torch.empty(ch.rows, slots, D, device=dev, dtype=acc)
    # [rows, slots, D]: index_add_ over 3-D slices takes a much faster CPU path than 2-D rows
    dk = torch.zeros(ch.rows, slots, D, device=dev, dtype=acc)
    dv = torch.zeros(ch.rows, slots, D, device=dev, dtype=acc)
    dkv_sel = torch.empty(c, K * slots, D, device=dev, dtype=acc)  # reused for dV then dK
    for r0, r1 in ch:
        n = r1 - r0
        rows = ch.sel[r0:r1].reshape(-1)
        ks = ch.gather(kb, r0, r1, 0)
        vs = ch.gather(vb, r0, r1, 1)
        q = qb[r0:r1].to(acc) * scale  # pre-scaled: dK = dS^T (scale q) needs no rescale
        g = dob[r0:r1].to(acc)
        p, _ = ch.softmax_(q, ks, r0, r1, with_lse=False)  # [n, slots, K * slots]
        buf = dkv_sel[:n]
        torch.bmm(p.transpose(1, 2), g, out=buf)  # dV of the selected tiles
        dv.index_add_(0, rows, buf.view(n * K, slots, D))
        dp = torch.bmm(g, vs.transpose(1, 2), out=ch.score_bufs[1][:n])
        # dS = P * (dP - rowsum(P * dP)), in place: dp <- P*dP - P*rowsum(P*dP)
        dp.mul_(p)
        dp.sub_(p.mul_(dp.sum(-1, keepdim=True)))
        torch.bmm(dp, ks, out=dq[r0:r1]).mul_(scale)
        torch.bmm(dp.transpose(1, 2), q, out=buf)  # dK of the selected tiles
        dk.index_add_(0, rows, buf.view(n * K, slots, D))
    shape = (B, H, Sp, D)
    return (
        dq.view(shape).to(q_t.dtype),
        dk.view(shape).to(k_t.dtype),
        dv.view(shape).to(v_t.dtype),
    )
