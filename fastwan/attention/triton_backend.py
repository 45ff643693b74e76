"""Triton kernels for the VSA fine stage: forward and an atomic-free, deterministic backward.

Layout (shared by every fine-stage backend, see ``torch_backend``):
  q_t, k_t, v_t, out, do: [B, H, N * slots, D] contiguous, tiled (``tiling.TilePlan``);
                          tile n owns rows [n * slots, (n + 1) * slots): its counts[n]
                          valid tokens first, then pad rows of arbitrary content.
  idx:    [B, H, N, k] int, the k selected key tiles of each query tile (ascending).
  counts: [N] int32, valid tokens per tile.
  lse:    [B, H, N * slots] float32, natural-log log-sum-exp of the scaled scores.

``slots`` is a power of two >= 16 so that one tile is one ``tl.dot`` block
(BLOCK_M = BLOCK_N = slots); the head dim D is padded to a power-of-two BLOCK_D with
masked loads and stores, so any D works (40, 64, 72, 128, ...).

Kernels (grid = (tiles, B * H); the batch-head index is the slow axis):
  _fwd_kernel     one program per query tile: online softmax (in base 2) over the tile's k
                  selected key tiles, fp32 accumulation; writes out and lse.
  _dq_kernel      one program per query tile, two passes over its selected key tiles:
                  pass 1 renormalises P = exp(s - lse) row-wise and computes
                  delta = rowsum(P * dP) (both stored for _dkdv_kernel); pass 2 forms
                  dS = P * (dP - delta) and dQ = scale * dS @ K.
  _dkdv_kernel    one program per key tile: loops over the query tiles that selected it,
                  read from a reverse (key -> query) index in CSR form built with torch
                  (``build_reverse_index``); dV = P^T @ dO, dK = scale * dS^T @ Q.
Every output row is written by exactly one program in a fixed loop order, so the backward
needs no atomics and is bit-for-bit deterministic.

Why delta is not rowsum(dO * O) as in flash attention: at large activations (|s| ~ 1e3)
the saved fp32 lse is off by ~1e-3, scaling a whole row of P, and a float16 / bfloat16 O
is rounded; dS = P * (dP - delta) sums to zero per row in exact arithmetic and this
cancellation amplifies both errors (measured on CPU at float16, x30 activations: dQ and dK
up to 5x the error of dense SDPA). Pass 1 costs two extra dots per (query tile, key tile) pair
(9 instead of 7 in the backward) and makes the gradients as accurate as dense attention's.

Masking: pad key rows are excluded from the softmax; pad query rows are loaded as zeros
and their dO / delta treated as zero, so they never contribute to dK / dV and their dQ is
zero (their outputs are discarded by ``TilePlan.untile``). Pad rows of ``out`` and ``lse``
are meaningless (finite for finite inputs). Non-finite inputs: masked values are replaced
(``tl.where``), never multiplied by 0, and pad rows of dQ / dK / dV are stored as exact
zeros, so a nan or inf reaches only the rows that attend to it (see
``video_sparse_attention``).

Dtypes: float32, float16 and bfloat16 (float64 is not supported: use backend='torch').
Scores, softmax and accumulators are float32; P and dS are cast to the operand dtype
before their ``tl.dot`` (as flash attention does). float32 inputs use exact ("ieee") dots
rather than TF32: correct but slow on a GPU, and limited to head dim <= 128 there (shared
memory); bfloat16 / float16 are the fast path. On CPU the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1``), which mishandles bfloat16 dots: test float32 / float16 there.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fastwan.attention.tiling import slots_for as tiling_slots_for

# log2(e): scores are kept in base 2 so that tl.exp2 can be used. Kernels spell constants
# as literals: @triton.jit code reads module globals only when they are tl.constexpr.
LOG2E = 1.4426950408889634

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def slots_for(tile_numel: int) -> int:
    """Tiled-layout positions per tile: a power of two >= max(16, tile_numel), the smallest
    block ``tl.dot`` and ``tl.arange`` accept (64 -> 64, 27 -> 32, 8 -> 16). The rule lives
    in :func:`fastwan.attention.tiling.slots_for`, which the public API calls."""
    return tiling_slots_for("triton", tile_numel)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _kv_scores(
    q, K, V, COUNTS, head, kt, rows, cols, d_ok, D, qk_scale,
    SLOTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Key/value tile ``kt`` ([SLOTS, BLOCK_D]; pad rows load as zeros so 0-probability
    columns never meet inf / nan) and the scores of ``q`` against it, base 2, pad keys at
    -inf: ``[SLOTS(q), SLOTS(k)]``."""
    k_ok = rows < tl.load(COUNTS + kt)
    kv_off = (kt * SLOTS + rows)[:, None] * D + cols[None, :]
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + head + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + head + kv_off, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    return k, v, tl.where(k_ok[None, :], s, float("-inf"))


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, IDX, COUNTS,
    N, KSEL, D, qk_scale,
    SLOTS: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)  # query tile
    bh = tl.program_id(1).to(tl.int64)  # int64: B * H * N * slots * D may exceed 2**31
    rows = tl.arange(0, SLOTS)
    cols = tl.arange(0, BLOCK_D)
    d_ok = cols < D
    head = bh * N * SLOTS * D  # start of this (batch, head) in q/k/v/o

    q_ok = rows < tl.load(COUNTS + n)
    q_off = (n * SLOTS + rows)[:, None] * D + cols[None, :]
    # Pad query rows load as zeros: their scores stay finite whatever the pad holds.
    q = tl.load(Q + head + q_off, mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([SLOTS], float("-inf"), tl.float32)  # running max (base-2 units)
    l_i = tl.zeros([SLOTS], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([SLOTS, BLOCK_D], tl.float32)
    sel = IDX + (bh * N + n) * KSEL
    for j in range(0, KSEL):
        k, v, s = _kv_scores(
            q, K, V, COUNTS, head, tl.load(sel + j), rows, cols, d_ok, D, qk_scale,
            SLOTS, PRECISION,
        )  # fmt: skip
        # Every tile has >= 1 valid key, so m_new is finite from the first tile on, unless
        # infinite inputs put a whole tile at -inf: exponentiate against 0 then (p = 0, and
        # a row that stays at -inf ends as 0 / 0 = nan, as a dense softmax gives).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + head + q_off, acc.to(O.dtype.element_ty), mask=d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln(2): base 2 -> natural log
    tl.store(LSE + bh * N * SLOTS + n * SLOTS + rows, lse)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DQ, LSE2, DELTA, IDX, COUNTS,
    N, KSEL, D, qk_scale, scale,
    SLOTS: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)  # query tile
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, SLOTS)
    cols = tl.arange(0, BLOCK_D)
    d_ok = cols < D
    head = bh * N * SLOTS * D
    row0 = bh * N * SLOTS + n * SLOTS  # first lse / delta row of this tile

    q_ok = rows < tl.load(COUNTS + n)
    q_off = (n * SLOTS + rows)[:, None] * D + cols[None, :]
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + head + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + head + q_off, mask=q_mask, other=0.0)  # pad rows: no gradient
    lse2 = tl.load(LSE + row0 + rows, mask=q_ok, other=0.0) * 1.4426950408889634  # base 2
    sel = IDX + (bh * N + n) * KSEL

    # Pass 1: row sums of P = exp2(s - lse2) and of P * dP. The saved lse is rounded
    # (|s| ~ 1e3 at large activations), which scales a whole row of P by up to ~1e-3, and
    # rowsum(dO * O) carries O's low-precision rounding; dS = P (dP - delta) cancels and
    # amplifies both. Renormalising P and taking delta from the same P removes them.
    l_i = tl.zeros([SLOTS], tl.float32)
    pdp_i = tl.zeros([SLOTS], tl.float32)
    for j in range(0, KSEL):
        k, v, s = _kv_scores(
            q, K, V, COUNTS, head, tl.load(sel + j), rows, cols, d_ok, D, qk_scale,
            SLOTS, PRECISION,
        )  # fmt: skip
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        l_i += tl.sum(p, 1)
        pdp_i += tl.sum(p * dp, 1)
    lse2 = lse2 + tl.log2(l_i)  # every tile has a valid key: l_i > 0
    # rowsum(P * dP) = rowsum(dO * O) in exact arithmetic; 0 on pad rows (where an infinite
    # key could make it nan through 0 * inf, which _dkdv_kernel would spread to dK)
    delta = tl.where(q_ok, pdp_i / l_i, 0.0)
    tl.store(LSE2 + row0 + rows, lse2)
    tl.store(DELTA + row0 + rows, delta)

    # Pass 2: dS = P * (dP - delta), dQ = scale * dS @ K.
    dq = tl.zeros([SLOTS, BLOCK_D], tl.float32)
    for j in range(0, KSEL):
        k, v, s = _kv_scores(
            q, K, V, COUNTS, head, tl.load(sel + j), rows, cols, d_ok, D, qk_scale,
            SLOTS, PRECISION,
        )  # fmt: skip
        p = tl.exp2(s - lse2[:, None])  # [SLOTS(q), SLOTS(k)] softmax probabilities
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq = tl.where(q_ok[:, None], dq * scale, 0.0)  # pad rows: exactly 0, even by 0 * inf
    tl.store(DQ + head + q_off, dq.to(DQ.dtype.element_ty), mask=d_ok[None, :])


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, REV_OFFSETS, REV_QTILES, COUNTS,
    N, D, qk_scale, scale,
    SLOTS: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    kt = tl.program_id(0)  # key tile
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, SLOTS)
    cols = tl.arange(0, BLOCK_D)
    d_ok = cols < D
    head = bh * N * SLOTS * D

    k_ok = rows < tl.load(COUNTS + kt)
    kv_off = (kt * SLOTS + rows)[:, None] * D + cols[None, :]
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + head + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + head + kv_off, mask=kv_mask, other=0.0)

    dk = tl.zeros([SLOTS, BLOCK_D], tl.float32)
    dv = tl.zeros([SLOTS, BLOCK_D], tl.float32)
    # The query tiles that selected this key tile, ascending (fixed order: deterministic).
    lo = tl.load(REV_OFFSETS + bh * N + kt)
    hi = tl.load(REV_OFFSETS + bh * N + kt + 1)
    for i in range(lo, hi):
        n = tl.load(REV_QTILES + i)
        q_ok = rows < tl.load(COUNTS + n)
        q_off = (n * SLOTS + rows)[:, None] * D + cols[None, :]
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + head + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + head + q_off, mask=q_mask, other=0.0)
        row0 = bh * N * SLOTS + n * SLOTS
        lse2 = tl.load(LSE2 + row0 + rows)  # renormalised, base 2 (from _dq_kernel)
        delta = tl.load(DELTA + row0 + rows)  # 0 on pad rows
        # Transposed scores [SLOTS(k), SLOTS(q)], so dK and dV come out without a transpose.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        pair_ok = k_ok[:, None] & q_ok[None, :]
        p_t = tl.where(pair_ok, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = tl.where(pair_ok, p_t * (dp_t - delta[None, :]), 0.0)  # not 0 * inf
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    # Pad key rows: exactly 0 (TilePlan.tile's backward adds them to a valid token).
    dk = tl.where(k_ok[:, None], dk * scale, 0.0)
    dv = tl.where(k_ok[:, None], dv, 0.0)
    tl.store(DK + head + kv_off, dk.to(DK.dtype.element_ty), mask=d_ok[None, :])
    tl.store(DV + head + kv_off, dv.to(DV.dtype.element_ty), mask=d_ok[None, :])


@triton.jit
def _tile_mean_kernel(
    X, OUT, COUNTS, N, D,
    SLOTS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Mean of one tile's valid slots, accumulated in float32 from X's own dtype (no
    float32 copy of the tiled tensor): [SLOTS, D] -> [D]."""
    n = tl.program_id(0)  # tile
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, SLOTS)
    cols = tl.arange(0, BLOCK_D)
    d_ok = cols < D
    count = tl.load(COUNTS + n)
    off = (bh * N * SLOTS + n * SLOTS + rows)[:, None] * D + cols[None, :]
    x = tl.load(X + off, mask=(rows < count)[:, None] & d_ok[None, :], other=0.0)
    mean = tl.sum(x.to(tl.float32), 0) / count.to(tl.float32)
    tl.store(OUT + (bh * N + n) * D + cols, mean, mask=d_ok)


# ----------------------------------------------------------------------------- launchers


def _check(q_t, k_t, v_t, idx, slots) -> tuple[int, int, int, int, int]:
    if q_t.dtype not in _SUPPORTED:
        raise ValueError(
            f"backend='triton' supports float32, float16 and bfloat16, got {q_t.dtype}; "
            "use backend='torch' (e.g. for float64 gradcheck)"
        )
    if slots < 16 or slots & (slots - 1):
        raise ValueError(f"slots must be a power of two >= 16 (see slots_for), got {slots}")
    if k_t.shape != q_t.shape or v_t.shape != q_t.shape:
        raise ValueError(f"q, k, v shapes differ: {q_t.shape}, {k_t.shape}, {v_t.shape}")
    if k_t.dtype != q_t.dtype or v_t.dtype != q_t.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q_t.dtype}, {k_t.dtype}, {v_t.dtype}")
    B, H, Sp, D = q_t.shape
    if Sp % slots:
        raise ValueError(f"tiled length {Sp} is not a multiple of slots={slots}")
    N = Sp // slots
    if tuple(idx.shape[:3]) != (B, H, N):
        raise ValueError(f"idx has shape {tuple(idx.shape)}, expected [{B}, {H}, {N}, k]")
    if Sp * D >= 2**31:  # in-head offsets are int32
        raise ValueError(f"one head holds {Sp} x {D} elements; at most 2**31 - 1 supported")
    if q_t.is_cuda and q_t.dtype == torch.float32 and _block_d(D) > 128:
        # Exact fp32 dots stage operands through shared memory: > 227 KiB at BLOCK_D 256.
        raise ValueError(
            f"backend='triton' runs float32 only up to head dim 128 (got {D}); use bfloat16 "
            "or float16, or backend='torch'"
        )
    return B, H, N, idx.shape[-1], D


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not on whichever device happens to be current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    # Exact fp32 dots for fp32 inputs (as torch matmul by default); irrelevant for fp16/bf16.
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_warps(block_d: int, accumulators: int) -> int:
    # Two [slots, BLOCK_D] fp32 accumulators (dK, dV) at D >= 128 need 8 warps' registers.
    return 8 if block_d * accumulators >= 256 else 4


def build_reverse_index(idx: torch.Tensor, num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse (key tile -> query tiles) index of a selection, in CSR form.

    idx: [B, H, N, k] selected key tiles per query tile (``num_tiles`` = N).
    Returns ``offsets`` [B * H * N + 1] int64 and ``q_tiles`` [B * H * N * k] int32: the
    query tiles (within their batch-head, ascending) that selected key tile ``kt`` of
    batch-head ``bh`` are ``q_tiles[offsets[bh * N + kt] : offsets[bh * N + kt + 1]]``.
    """
    BH = idx.shape[0] * idx.shape[1]
    N, K = num_tiles, idx.shape[-1]
    dev = idx.device
    # Global key tile of every (bh, query tile, slot) entry, and its query tile.
    key = idx.reshape(BH, N * K).long() + torch.arange(BH, device=dev).view(BH, 1) * N
    key = key.reshape(-1)  # [BH * N * k]
    q_of = torch.arange(N, device=dev).repeat_interleave(K).repeat(BH)  # [BH * N * k]
    # A stable sort keeps entries of one key tile in (bh, query tile) order: ascending.
    order = torch.sort(key, stable=True).indices
    q_tiles = q_of[order].to(torch.int32)
    offsets = torch.zeros(BH * N + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(torch.bincount(key, minlength=BH * N), 0)
    return offsets, q_tiles


def tile_mean(x_t: torch.Tensor, counts: torch.Tensor, slots: int) -> torch.Tensor:
    """Mean over each tile's valid slots of a tiled ``[B, H, N * slots, D]`` tensor, in
    float32: ``[B, H, N, D]``. One read of x_t in its own dtype; the torch equivalent
    (``TilePlan.tiled_mean(x_t.float())``) first writes a float32 copy of it."""
    if x_t.dtype not in _SUPPORTED:
        raise ValueError(f"tile_mean supports float32, float16 and bfloat16, got {x_t.dtype}")
    B, H, Sp, D = x_t.shape
    if Sp % slots:
        raise ValueError(f"tiled length {Sp} is not a multiple of slots={slots}")
    N = Sp // slots
    x_t = x_t.contiguous()
    counts = counts.to(device=x_t.device, dtype=torch.int32).contiguous()  # [N]
    out = torch.empty(B, H, N, D, device=x_t.device, dtype=torch.float32)
    with _on_device(x_t):
        _tile_mean_kernel[(N, B * H)](
            x_t, out, counts, N, D, SLOTS=slots, BLOCK_D=_block_d(D), num_warps=4
        )
    return out


def fine_forward(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    slots: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-stage forward. Returns out [B, H, N*slots, D] (q's dtype), lse [B, H, N*slots]
    float32."""
    B, H, N, K, D = _check(q_t, k_t, v_t, idx, slots)
    q_t, k_t, v_t = q_t.contiguous(), k_t.contiguous(), v_t.contiguous()
    idx = idx.to(device=q_t.device, dtype=torch.int32).contiguous()  # [B, H, N, k]
    counts = counts.to(device=q_t.device, dtype=torch.int32).contiguous()  # [N]
    out = torch.empty_like(q_t)  # [B, H, N*slots, D]
    lse = torch.empty(q_t.shape[:-1], device=q_t.device, dtype=torch.float32)
    block_d = _block_d(D)
    with _on_device(q_t):
        _fwd_kernel[(N, B * H)](
            q_t, k_t, v_t, out, lse, idx, counts,
            N, K, D, float(scale) * LOG2E,
            SLOTS=slots, BLOCK_D=block_d, PRECISION=_precision(q_t.dtype),
            num_warps=_num_warps(block_d, 1), num_stages=2,
        )  # fmt: skip
    return out, lse


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fine-stage backward: (dq, dk, dv) in the inputs' dtypes. Gradients of pad query
    rows are taken as zero (their outputs are discarded). ``out`` is not needed: delta
    comes from the recomputed probabilities (see ``_dq_kernel``)."""
    B, H, N, K, D = _check(q_t, k_t, v_t, idx, slots)
    do, q_t, k_t, v_t = (t.contiguous() for t in (do, q_t, k_t, v_t))
    lse = lse.to(torch.float32).contiguous()  # [B, H, N*slots]
    idx = idx.to(device=q_t.device, dtype=torch.int32).contiguous()  # [B, H, N, k]
    counts = counts.to(device=q_t.device, dtype=torch.int32).contiguous()  # [N]
    offsets, q_tiles = build_reverse_index(idx, N)  # [B*H*N + 1], [B*H*N*k]
    block_d = _block_d(D)
    prec = _precision(q_t.dtype)
    grid = (N, B * H)
    qk_scale = float(scale) * LOG2E

    lse2 = torch.empty_like(lse)  # [B, H, N*slots] renormalised lse, base 2
    delta = torch.empty_like(lse)  # [B, H, N*slots] rowsum(P * dP)
    dq = torch.empty_like(q_t)
    dk = torch.empty_like(k_t)
    dv = torch.empty_like(v_t)
    with _on_device(q_t):
        _dq_kernel[grid](
            q_t, k_t, v_t, do, lse, dq, lse2, delta, idx, counts,
            N, K, D, qk_scale, float(scale),
            SLOTS=slots, BLOCK_D=block_d, PRECISION=prec,
            num_warps=_num_warps(block_d, 1), num_stages=2,
        )  # fmt: skip
        # Runs after _dq_kernel on the same stream: it reads lse2 and delta of every tile.
        _dkdv_kernel[grid](
            q_t, k_t, v_t, do, lse2, delta, dk, dv, offsets, q_tiles, counts,
            N, D, qk_scale, float(scale),
            SLOTS=slots, BLOCK_D=block_d, PRECISION=prec,
            num_warps=_num_warps(block_d, 2), num_stages=2,
        )  # fmt: skip
    return dq, dk, dv


__all__ = ["build_reverse_index", "fine_backward", "fine_forward", "slots_for", "tile_mean"]
