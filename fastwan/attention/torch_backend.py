"""Block-gather VSA fine stage in pure PyTorch: any device, forward and backward.

Each query tile attends to the tokens of its ``k`` selected key tiles. Query tiles are
processed in chunks so that the gathered keys/values of a long sequence are never all
materialised at once. A chunk holds whole softmax rows, so both passes normalise rows
exactly (as dense attention does) instead of going through ``exp(s - lse)``: an lse
rounded at ``|s| ~ 1e3`` scales a whole row of P by ``1 + 1e-4``, which the backward's
``dS = P (dP - rowsum(P dP))`` cancellation amplifies.

Partial edge tiles cost nothing for their padding (a 480P Wan grid, 21 x 30 x 52 in 4^3
tiles, is 18% padding): query tiles are grouped by valid count and only their valid rows
are computed, and keys are gathered token by token (valid tokens only) instead of tile by
tile. Grids that tile exactly keep the cheaper whole-tile gather.

Chunks are small (about one query tile per thread) and reuse preallocated buffers: on
CPU, fresh large allocations cost page faults.

Layout (shared by every fine-stage backend):
  q_t, k_t, v_t: [B, H, N * slots, D] tiled (see ``tiling.TilePlan``)
  idx:           [B, H, N, k] int, selected key tiles per query tile
  counts:        [N] int32, valid tokens per tile (keys beyond are masked)
  out:           [B, H, N * slots, D];  lse: [B, H, N * slots] (pad rows: 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CHUNK_BYTES = 8 * 2**20  # per thread (measured best: one row per thread)
# Token-index tables are built for this many (row, key) pairs at a time.
_INDEX_BLOCK = 2**20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax in float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Chunk:
    rows: slice  # query-tile rows, in the chunk order (see ``_Chunks.ordered``)
    n: int  # number of rows
    q_len: int  # valid query tokens per row (same for every row of a chunk)
    k_len: int  # gathered keys per row (the longest row's valid keys)
    key_index: torch.Tensor  # whole-tile: [n * K] tile ids; token: [n * k_len] token ids
    bias: torch.Tensor | None  # [n, 1, k_len] -inf past a row's keys, None when all equal
    pad: torch.Tensor | None  # [n, k_len, 1] bool, True past a row's keys (with bias)


class _Chunks:
    """Flattened query tiles (B * H * N rows), their selections and reusable buffers."""

    def __init__(self, q_t, idx, counts, slots, chunk_bytes, n_score_bufs, n_kv_bufs):
        B, H, Sp, D = q_t.shape
        self.shape = (B, H, Sp, D)
        self.N, self.K, self.D, self.slots = Sp // slots, idx.shape[-1], D, slots
        self.rows = B * H * self.N
        dev = q_t.device
        self.acc = _acc_dtype(q_t.dtype)
        self.key_tile = idx.reshape(self.rows, self.K).long()  # [rows, K] in [0, N)
        # selected key tiles as rows of the flattened [B * H * N] tile axis
        bh_base = torch.arange(B * H, device=dev).repeat_interleave(self.N) * self.N
        self.sel = self.key_tile + bh_base.view(-1, 1)  # [rows, K]
        counts = counts.to(dev).long()
        self.partial = bool((counts < slots).any())
        keys = self.K * slots
        if self.partial:
            self.counts = counts
            self.slot = torch.arange(slots, device=dev)
            q_len = counts.repeat(B * H)  # [rows]
            k_len = counts[self.key_tile].sum(1)  # [rows] valid keys per row
            # Group rows by query count; longest key rows first, so chunks pad little.
            self.order = torch.argsort(q_len * (keys + 1) + k_len, descending=True, stable=True)
            self.q_len = q_len[self.order].tolist()
            self.k_len = k_len[self.order].tolist()
        esize = torch.finfo(self.acc).bits // 8
        per_row = esize * (n_score_bufs * slots * keys + n_kv_bufs * keys * D)
        # A CPU batched matmul splits its batch over threads: whole rows per thread (3 rows
        # on 2 threads would idle one), chunk_bytes of working set each.
        threads = torch.get_num_threads() if dev.type == "cpu" else 1
        self.chunk = c = min(self.rows, threads * max(1, chunk_bytes // max(per_row, 1)))
        self.score_bufs = [
            torch.empty(c * slots * keys, device=dev, dtype=self.acc) for _ in range(n_score_bufs)
        ]
        self.kv_bufs = [
            torch.empty(c * keys, D, device=dev, dtype=q_t.dtype) for _ in range(n_kv_bufs)
        ]
        self.cast_bufs = (
            [torch.empty(c * keys, D, device=dev, dtype=self.acc) for _ in range(n_kv_bufs)]
            if q_t.dtype != self.acc
            else None
        )

    def __iter__(self):
        if not self.partial:
            for r0 in range(0, self.rows, self.chunk):
                r1 = min(self.rows, r0 + self.chunk)
                rows = slice(r0, r1)
                keys = self.sel[rows].reshape(-1)
                yield _Chunk(rows, r1 - r0, self.slots, self.K * self.slots, keys, None, None)
            return
        block = max(self.chunk, _INDEX_BLOCK // (self.K * self.slots))
        for b0 in range(0, self.rows, block):
            b1 = min(self.rows, b0 + block)
            table = self._token_table(b0, b1)  # [b1 - b0, longest row]
            r0 = b0
            while r0 < b1:
                q_len = self.q_len[r0]
                r1 = r0 + 1
                while r1 < min(b1, r0 + self.chunk) and self.q_len[r1] == q_len:
                    r1 += 1
                k_len = self.k_len[r0]  # rows are sorted: the first is the longest
                keys = table[r0 - b0 : r1 - b0, :k_len]
                bias = pad = None
                if self.k_len[r1 - 1] != k_len:
                    lens = torch.tensor(self.k_len[r0:r1], device=keys.device)
                    pad = torch.arange(k_len, device=keys.device) >= lens.view(-1, 1)
                    bias = torch.zeros(r1 - r0, 1, k_len, device=keys.device, dtype=self.acc)
                    bias.masked_fill_(pad.view(r1 - r0, 1, k_len), float("-inf"))
                    pad = pad.view(r1 - r0, k_len, 1)
                yield _Chunk(slice(r0, r1), r1 - r0, q_len, k_len, keys.reshape(-1), bias, pad)
                r0 = r1

    def ordered(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N * slots, ...] -> [rows, slots, ...] with query tiles in chunk order
        (grouped by valid count), so every chunk is a slice."""
        x = x.reshape(self.rows, self.slots, *x.shape[3:])
        return x.index_select(0, self.order) if self.partial else x

    def unordered(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``ordered``: [rows, slots, ...] -> [B, H, N * slots, ...]."""
        if self.partial:
            x = torch.empty_like(x).index_copy_(0, self.order, x)
        B, H, Sp, _ = self.shape
        return x.view(B, H, Sp, *x.shape[2:])

    def _token_table(self, b0: int, b1: int) -> torch.Tensor:
        """Valid key tokens of ordered rows b0:b1 as [b1 - b0, longest] token ids of the
        flattened [B * H * N * slots] axis, each row's tokens first, then pads (masked by the
        chunk's bias). Valid slots are a prefix of each tile."""
        rows = self.order[b0:b1]
        n, width = b1 - b0, max(self.k_len[b0:b1])
        tok = self.sel[rows].unsqueeze(-1) * self.slots + self.slot  # [n, K, slots]
        valid = (self.slot < self.counts[self.key_tile[rows]].unsqueeze(-1)).view(n, -1)
        # Pads point at the row's own (batch, head): its last tile's last slot, a pad slot
        # whenever some tile is partial (a copy of a valid token). What is gathered there
        # is zeroed (``gather``) and its gradient dropped (``scatter_add_``), so a
        # non-finite token cannot leak through 0 * inf into rows that did not select it.
        head_end = (self.sel[rows, 0] // self.N + 1) * self.N * self.slots  # [n]
        table = (head_end - 1).view(n, 1).expand(n, width + 1).clone()
        # row i's j-th valid token goes to column j; pads to a spare last column
        col = valid.cumsum(1).sub_(1).masked_fill_(~valid, width)  # [n, K * slots]
        table.scatter_(1, col, tok.view(n, -1))
        return table[:, :width]

    def gather(self, x, ch: _Chunk, i: int) -> torch.Tensor:
        """Selected keys of chunk ``ch`` from x ([rows * slots, D]) -> [n, k_len, D] in the
        acc dtype; zero past each row's keys."""
        n, D = ch.n, self.D
        buf = self.kv_bufs[i][: n * ch.k_len]
        if self.partial:
            torch.index_select(x, 0, ch.key_index, out=buf)
        else:  # whole tiles: one contiguous [slots * D] row each
            out_tiles = buf.view(n * self.K, self.slots * D)
            torch.index_select(x.view(-1, self.slots * D), 0, ch.key_index, out=out_tiles)
        out = buf.view(n, ch.k_len, D)
        if ch.pad is not None:
            out.masked_fill_(ch.pad, 0.0)
        if self.cast_bufs is None:
            return out
        return self.cast_bufs[i][: n * ch.k_len].view(n, ch.k_len, D).copy_(out)

    def scatter_add_(self, dx, src, ch: _Chunk) -> None:
        """dx[selected keys of ch] += src ([n, k_len, D], zeroed past each row's keys);
        dx is [rows * slots, D]."""
        if ch.pad is not None:
            src.masked_fill_(ch.pad, 0.0)
        if self.partial:
            dx.index_add_(0, ch.key_index, src.view(-1, self.D))
        else:  # [tiles, slots, D]: index_add_ over 3-D slices takes a faster CPU path
            dx3 = dx.view(-1, self.slots, self.D)
            dx3.index_add_(0, ch.key_index, src.view(-1, self.slots, self.D))

    def scores(self, i: int, ch: _Chunk) -> torch.Tensor:
        return self.score_bufs[i][: ch.n * ch.q_len * ch.k_len].view(ch.n, ch.q_len, ch.k_len)

    def softmax_(self, q_scaled, ks, ch: _Chunk, with_lse: bool):
        """Exact row softmax of ``q_scaled @ ks^T`` (q pre-multiplied by the softmax scale),
        in place in score buffer 0.

        Returns P [n, q_len, k_len] and, if asked, the row log-sum-exp [n, q_len]."""
        s = self.scores(0, ch)
        if ch.bias is None:
            torch.bmm(q_scaled, ks.transpose(1, 2), out=s)
        else:
            torch.baddbmm(ch.bias, q_scaled, ks.transpose(1, 2), out=s)
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
    with_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out [B, H, N * slots, D] and lse [B, H, N * slots] (or, without
    ``with_lse``, an empty [B, H, 0]: this backend's backward does not need it)."""
    q_t, k_t, v_t = q_t.contiguous(), k_t.contiguous(), v_t.contiguous()
    ch_ = _Chunks(q_t, idx, counts, slots, chunk_bytes, n_score_bufs=1, n_kv_bufs=2)
    B, H, Sp, D = ch_.shape
    qo = ch_.ordered(q_t)  # [rows, slots, D]
    kx = k_t.reshape(-1, D)
    vx = v_t.reshape(-1, D)
    new = torch.zeros if ch_.partial else torch.empty  # pad query rows stay 0
    out = new(ch_.rows, slots, D, device=q_t.device, dtype=ch_.acc)
    lse = new(ch_.rows, slots if with_lse else 0, device=q_t.device, dtype=ch_.acc)
    for ch in ch_:
        ks = ch_.gather(kx, ch, 0)  # [n, k_len, D]
        vs = ch_.gather(vx, ch, 1)
        q = qo[ch.rows, : ch.q_len].to(ch_.acc) * scale  # small: scaling q beats scaling S
        p, row_lse = ch_.softmax_(q, ks, ch, with_lse=with_lse)
        torch.bmm(p, vs, out=out[ch.rows, : ch.q_len])
        if with_lse:
            lse[ch.rows, : ch.q_len] = row_lse
    lse = ch_.unordered(lse) if with_lse else lse.new_empty(B, H, 0)
    return ch_.unordered(out).to(q_t.dtype), lse


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
    # lse is unused: rows are renormalised exactly (see the module docstring).
    do, q_t, k_t, v_t, out = (t.contiguous() for t in (do, q_t, k_t, v_t, out))
    ch_ = _Chunks(q_t, idx, counts, slots, chunk_bytes, n_score_bufs=2, n_kv_bufs=2)
    B, H, Sp, D = ch_.shape
    acc, dev = ch_.acc, q_t.device
    qo, doo = ch_.ordered(q_t), ch_.ordered(do)  # [rows, slots, D]
    kx = k_t.reshape(-1, D)
    vx = v_t.reshape(-1, D)
    # delta = rowsum(P * dP) = rowsum(dO * O) when O is exact (not rounded to a low
    # precision): one pass over [S, D] instead of three over the scores.
    delta = None
    if out.dtype == acc:
        delta = (doo * ch_.ordered(out)).sum(-1, keepdim=True)  # [rows, slots, 1]
    new = torch.zeros if ch_.partial else torch.empty  # pad query rows get no gradient
    dq = new(ch_.rows, slots, D, device=dev, dtype=acc)
    dk = torch.zeros(ch_.rows * slots, D, device=dev, dtype=acc)
    dv = torch.zeros(ch_.rows * slots, D, device=dev, dtype=acc)
    dkv_sel = torch.empty(ch_.chunk * ch_.K * slots, D, device=dev, dtype=acc)
    for ch in ch_:
        n = ch.n
        ks = ch_.gather(kx, ch, 0)  # [n, k_len, D]
        vs = ch_.gather(vx, ch, 1)
        q = qo[ch.rows, : ch.q_len].to(acc) * scale  # pre-scaled: dK = dS^T (scale q)
        g = doo[ch.rows, : ch.q_len].to(acc)  # [n, q_len, D]
        p, _ = ch_.softmax_(q, ks, ch, with_lse=False)  # [n, q_len, k_len]
        buf = dkv_sel[: n * ch.k_len].view(n, ch.k_len, D)  # reused for dV then dK
        torch.bmm(p.transpose(1, 2), g, out=buf)  # dV of the selected keys
        ch_.scatter_add_(dv, buf, ch)
        dp = torch.bmm(g, vs.transpose(1, 2), out=ch_.scores(1, ch))
        # dS = P * (dP - rowsum(P * dP)), in place
        if delta is not None:
            dp.sub_(delta[ch.rows, : ch.q_len]).mul_(p)
        else:  # dp <- P*dP - P*rowsum(P*dP)
            dp.mul_(p)
            dp.sub_(p.mul_(dp.sum(-1, keepdim=True)))
        torch.bmm(dp, ks, out=dq[ch.rows, : ch.q_len]).mul_(scale)
        torch.bmm(dp.transpose(1, 2), q, out=buf)  # dK of the selected keys
        ch_.scatter_add_(dk, buf, ch)
    shape = (B, H, Sp, D)
    return (
        ch_.unordered(dq).to(q_t.dtype),
        dk.view(shape).to(k_t.dtype),
        dv.view(shape).to(v_t.dtype),
    )
