"""VSA: tiling, selection, torch backend vs the reference oracle, validation, compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _rules import FACTOR, attention_outputs_and_grads, dense_errors, rel_err, round_to

from fastwan.attention import get_tile_plan, num_selected_tiles, video_sparse_attention
from fastwan.attention.reference import token_tiles, topk_by_rank, vsa_reference
from fastwan.attention.tiling import select_topk_tiles
from fastwan.attention.torch_backend import fine_backward, fine_forward


def assert_clear_selection(q, k, grid, tile, k_sel, min_gap):
    """The top-``k_sel`` boundary of the coarse scores (float64, from q and k as given) is
    at least ``min_gap`` (relative to the largest score of the head) in every row: a test
    that asserts which tiles two computations select then does not depend on their float
    rounding (another CPU's SIMD width or thread count changes it in the last bits)."""
    plan = get_tile_plan(grid, tile)
    qc, kc = plan.tile_mean(q.double()), plan.tile_mean(k.double())
    s = qc @ kc.transpose(-1, -2)  # [B, H, N, N]; the softmax scale does not matter
    if k_sel == plan.num_tiles:
        return
    top = torch.sort(s, -1, descending=True).values
    gap = (top[..., k_sel - 1] - top[..., k_sel]) / s.abs().amax((-1, -2), keepdim=True)[..., 0]
    assert gap.min() >= min_gap, f"test data: top-{k_sel} margin {gap.min():.3g} < {min_gap}"


def _qkv(B, H, S, D, scale=1.0, seed=0, dtype=torch.float64, n=3):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H, S, D, generator=g, dtype=dtype) for _ in range(n)]
    out[0] = out[0] * scale  # scale q and k: sharper softmax, as large activations give
    out[1] = out[1] * scale
    return out


# ---------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("grid", [(3, 5, 7), (5, 10, 13), (4, 8, 8), (1, 1, 1)])
@pytest.mark.parametrize("tile", [(4, 4, 4), (2, 3, 3), (1, 2, 5)])
def test_tile_untile_are_inverse_permutations(grid, tile):
    plan = get_tile_plan(grid, tile)
    S = math.prod(grid)
    x = torch.arange(S).view(1, 1, S, 1)
    assert torch.equal(plan.untile(plan.tile(x)), x)
    # every raster token sits in exactly one valid slot
    valid_slots = plan.gather_index[plan.slot_valid]
    assert torch.equal(torch.sort(valid_slots).values, torch.arange(S))
    assert torch.equal(plan.scatter_index.sort().values, torch.nonzero(plan.slot_valid)[:, 0])


@pytest.mark.parametrize("grid,tile", [((3, 5, 7), (4, 4, 4)), ((5, 6, 9), (2, 3, 4))])
def test_tiles_in_thw_order_raster_inside(grid, tile):
    plan = get_tile_plan(grid, tile)
    ref_tiles, n = token_tiles(grid, tile)
    assert plan.num_tiles == n
    assert torch.equal(plan.token_tile, ref_tiles)
    assert torch.equal(plan.counts.long(), torch.bincount(ref_tiles, minlength=n))
    T, H, W = grid
    # inside each tile, valid slots hold raster-increasing tokens, then padding
    slots = plan.gather_index.view(n, plan.slots)
    valid = plan.slot_valid.view(n, plan.slots)
    for t in range(n):
        c = int(plan.counts[t])
        assert valid[t, :c].all() and not valid[t, c:].any()
        assert torch.all(slots[t, 1:c] > slots[t, : c - 1])
    # tile order is t-major: the first token of tile i+1 along w is further right
    nt, nh, nw = plan.tiles_per_dim
    assert (nt, nh, nw) == tuple(-(-g // s) for g, s in zip(grid, tile))
    first = slots[:, 0]
    w_of = first % W
    assert torch.all(w_of.view(nt, nh, nw)[..., 1:] > w_of.view(nt, nh, nw)[..., :-1])


def test_plan_is_cached():
    assert get_tile_plan((3, 5, 7), (4, 4, 4)) is get_tile_plan((3, 5, 7), (4, 4, 4))
    assert get_tile_plan((3, 5, 7), (4, 4, 4)) is not get_tile_plan((3, 5, 7), (2, 2, 2))


def test_tile_mean_over_valid_tokens_only():
    grid, tile = (3, 5, 7), (4, 4, 4)
    plan = get_tile_plan(grid, tile)
    x = torch.randn(1, 1, 105, 3, dtype=torch.float64)
    m = plan.tile_mean(x)
    for t in range(plan.num_tiles):
        tok = (plan.token_tile == t).nonzero()[:, 0]
        torch.testing.assert_close(m[0, 0, t], x[0, 0, tok].mean(0))


@pytest.mark.parametrize(
    "n,sparsity,k", [(10, 0.8, 2), (10, 0.0, 10), (10, 0.95, 1), (7, 0.5, 4), (100, 0.9, 10)]
)
def test_num_selected_tiles(n, sparsity, k):
    assert num_selected_tiles(n, sparsity) == k


def test_topk_ties_go_to_lower_index():
    scores = torch.tensor([[[[1.0, 3.0, 3.0, 2.0, 3.0]]]])
    assert select_topk_tiles(scores, 2).tolist() == [[[[1, 2]]]]
    assert select_topk_tiles(scores, 4).tolist() == [[[[1, 2, 3, 4]]]]
    zeros = torch.zeros(1, 1, 2, 6)
    assert select_topk_tiles(zeros, 3).tolist() == [[[[0, 1, 2], [0, 1, 2]]]]


def test_selection_matches_independent_topk():
    grid, D = (5, 10, 13), 32
    q, k, v = _qkv(2, 3, math.prod(grid), D, seed=1)
    _, idx = video_sparse_attention(
        q, k, v, grid=grid, sparsity=0.7, backend="torch", return_indices=True
    )
    plan = get_tile_plan(grid, (4, 4, 4))
    # independent: coarse means by loops over coordinates, top-k by rank counting
    tiles, n = token_tiles(grid, (4, 4, 4))
    qc = torch.stack([q[:, :, tiles == t].mean(2) for t in range(n)], 2)
    kc = torch.stack([k[:, :, tiles == t].mean(2) for t in range(n)], 2)
    chosen = topk_by_rank(qc @ kc.transpose(-1, -2) / math.sqrt(D), idx.shape[-1])
    expect = torch.nonzero(chosen)[:, -1].view_as(idx)
    assert_clear_selection(q, k, grid, (4, 4, 4), idx.shape[-1], min_gap=1e-10)  # float64
    assert plan.num_tiles == n and torch.equal(idx, expect)


# ------------------------------------------------------------ torch backend vs oracle

CASES = [
    # grid, tile, B, H, D, sparsity, scale
    ((3, 5, 7), (4, 4, 4), 2, 2, 64, 0.0, 1.0),
    ((3, 5, 7), (4, 4, 4), 2, 2, 64, 0.5, 10.0),
    ((5, 10, 13), (4, 4, 4), 2, 2, 128, 0.8, 1.0),
    ((5, 10, 13), (4, 4, 4), 1, 2, 40, 0.9, 30.0),
    ((2, 30, 52), (4, 4, 4), 1, 1, 64, 0.9, 1.0),
    ((2, 30, 52), (4, 4, 4), 1, 2, 64, 0.5, 10.0),
    ((5, 6, 9), (2, 3, 3), 2, 2, 72, 0.8, 1.0),
    ((3, 5, 7), (1, 2, 2), 1, 3, 64, 0.5, 30.0),
]


@pytest.mark.parametrize("grid,tile,B,H,D,sparsity,scale", CASES)
def test_torch_backend_fp32_matches_reference(grid, tile, B, H, D, sparsity, scale):
    """fp32 torch backend vs the float64 oracle, forward and grads of q, k, v, gate;
    error <= FACTOR x dense SDPA's fp32 error on the same inputs."""
    S = math.prod(grid)
    q, k, v, gate, do = _qkv(B, H, S, D, scale=scale, seed=sum(grid) + D, n=5)
    q, k, v, gate, do = round_to(torch.float32, q, k, v, 0.5 * gate, do)
    _, idx = video_sparse_attention(
        q.float(),
        k.float(),
        v.float(),
        grid=grid,
        tile_size=tile,
        sparsity=sparsity,
        backend="torch",
        return_indices=True,
    )
    k_sel = idx.shape[-1]

    def fast(q, k, v, g):
        return video_sparse_attention(
            q, k, v, grid=grid, tile_size=tile, topk=k_sel, gate=g, backend="torch"
        )

    def oracle(q, k, v, g):  # same selection as the fp32 run, computed in float64
        return vsa_reference(q, k, v, grid=grid, tile_size=tile, topk=k_sel, gate=g, indices=idx)[0]

    got = attention_outputs_and_grads(
        fast, q.float(), k.float(), v.float(), do.float(), (gate.float(),)
    )
    ref = attention_outputs_and_grads(oracle, q, k, v, do, (gate,))
    dense = dense_errors(q, k, v, do, torch.float32)
    for name, a, b, d in zip(["out", "dq", "dk", "dv"], got, ref, dense):
        assert rel_err(a, b) <= FACTOR * d + 1e-6, (name, rel_err(a, b), d)
    assert rel_err(got[4], ref[4]) <= FACTOR * dense[0] + 1e-6  # gate grad


@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])
def test_torch_backend_bf16_tolerance_rule(scale):
    grid, D = (3, 5, 7), 64
    q, k, v, do = round_to(torch.bfloat16, *_qkv(1, 2, math.prod(grid), D, scale=scale, n=4))
    _, idx = video_sparse_attention(
        q.bfloat16(),
        k.bfloat16(),
        v.bfloat16(),
        grid=grid,
        sparsity=0.5,
        backend="torch",
        return_indices=True,
    )

    def fast(q, k, v):
        return video_sparse_attention(q, k, v, grid=grid, topk=idx.shape[-1], backend="torch")

    def oracle(q, k, v):
        return vsa_reference(q, k, v, grid=grid, topk=idx.shape[-1], indices=idx)[0]

    got = attention_outputs_and_grads(fast, q.bfloat16(), k.bfloat16(), v.bfloat16(), do.bfloat16())
    ref = attention_outputs_and_grads(oracle, q, k, v, do)
    dense = dense_errors(q, k, v, do, torch.bfloat16)
    for name, a, b, d in zip(["out", "dq", "dk", "dv"], got, ref, dense):
        assert rel_err(a, b) <= FACTOR * d, (name, rel_err(a, b), d)


def test_float64_gradcheck():
    grid = (2, 3, 5)
    q, k, v, g = (t.requires_grad_() for t in _qkv(1, 2, 30, 8, seed=3, n=4))
    f = lambda q, k, v, g: video_sparse_attention(  # noqa: E731
        q, k, v, grid=grid, tile_size=(2, 2, 2), sparsity=0.5, gate=g, backend="torch"
    )
    assert torch.autograd.gradcheck(f, (q, k, v, g))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_sparsity_zero_equals_dense(backend):
    grid = (3, 5, 7)
    q, k, v, do = _qkv(2, 2, 105, 64, seed=4, n=4)
    out = attention_outputs_and_grads(
        lambda q, k, v: video_sparse_attention(q, k, v, grid=grid, sparsity=0.0, backend=backend),
        q,
        k,
        v,
        do,
    )
    ref = attention_outputs_and_grads(F.scaled_dot_product_attention, q, k, v, do)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_full_selection_runs_dense_sdpa_with_the_gate(backend, monkeypatch):
    """Every tile selected (sparsity 0): the fine stage is PyTorch's SDPA, not the block
    kernel, and with the gate the result and gradients still match the oracle."""
    import fastwan.attention.api as api

    class NoKernel:
        @staticmethod
        def apply(*args):
            raise AssertionError("the block-sparse fine stage ran at full selection")

    monkeypatch.setattr(api, "VSAFineFunction", NoKernel)
    grid = (3, 5, 7)
    q, k, v, gate, do = _qkv(1, 2, 105, 16, seed=12, n=5)
    kw = dict(grid=grid, tile_size=(2, 3, 4), sparsity=0.0)
    out, idx = video_sparse_attention(
        q, k, v, gate=gate, backend=backend, return_indices=True, **kw
    )
    n = get_tile_plan(grid, (2, 3, 4)).num_tiles
    assert torch.equal(idx, torch.arange(n).expand(1, 2, n, n))
    got = attention_outputs_and_grads(
        lambda q, k, v, g: video_sparse_attention(q, k, v, gate=g, backend=backend, **kw),
        q, k, v, do, (gate,),
    )  # fmt: skip

    def oracle(q, k, v, g):  # the dense masked oracle, which works in float32
        return vsa_reference(q, k, v, grid=grid, tile_size=(2, 3, 4), topk=n, gate=g)[0]

    ref = attention_outputs_and_grads(oracle, q, k, v, do, (gate,))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sparsity_changes_the_output():
    grid = (5, 10, 13)
    q, k, v = _qkv(1, 2, 650, 32, seed=5, dtype=torch.float32)
    dense = video_sparse_attention(q, k, v, grid=grid, sparsity=0.0, backend="torch")
    sparse = video_sparse_attention(q, k, v, grid=grid, sparsity=0.9, backend="torch")
    assert rel_err(sparse, dense) > 1e-2


def test_gate_adds_broadcast_coarse_attention():
    grid = (3, 5, 7)
    q, k, v = _qkv(1, 1, 105, 16, seed=6)
    plan = get_tile_plan(grid, (4, 4, 4))
    base = video_sparse_attention(q, k, v, grid=grid, sparsity=0.5, backend="torch")
    ones = torch.ones_like(q)
    gated = video_sparse_attention(q, k, v, grid=grid, sparsity=0.5, gate=ones, backend="torch")
    qc, kc, vc = plan.tile_mean(q), plan.tile_mean(k), plan.tile_mean(v)
    coarse = torch.softmax(qc @ kc.transpose(-1, -2) / 4.0, -1) @ vc  # [1, 1, N, 16]
    torch.testing.assert_close(gated - base, coarse[:, :, plan.token_tile])
    zero = video_sparse_attention(q, k, v, grid=grid, sparsity=0.5, gate=0 * ones, backend="torch")
    # Bit-equal by construction: the same ops on the same inputs in one process, plus
    # 0 * coarse = 0 exactly.
    torch.testing.assert_close(zero, base, rtol=0, atol=0)


def test_deterministic_across_runs():
    grid = (5, 6, 9)
    q, k, v, g, do = _qkv(2, 2, 270, 32, seed=8, dtype=torch.float32, n=5)

    def run():
        return attention_outputs_and_grads(
            lambda q, k, v, g: video_sparse_attention(
                q, k, v, grid=grid, sparsity=0.6, gate=g, backend="torch"
            ),
            q,
            k,
            v,
            do,
            (g,),
        )

    # Bit-equal by construction: the same ops on the same inputs, threads and buffers in
    # one process (the backward uses no atomics); not a comparison across machines.
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_chunking_does_not_change_results():
    """Small chunk budgets (bounded memory) give the same numbers as one big chunk."""
    grid, tile = (5, 10, 13), (4, 4, 4)
    q, k, v, do = _qkv(2, 2, 650, 32, seed=9, dtype=torch.float32, n=4)
    plan = get_tile_plan(grid, tile)
    qt, kt, vt = plan.tile(q), plan.tile(k), plan.tile(v)
    idx = torch.randint(
        0, plan.num_tiles, (2, 2, plan.num_tiles, 4), generator=torch.Generator().manual_seed(0)
    )
    idx = torch.sort(idx, -1).values.to(torch.int32)
    args = (idx, plan.counts, plan.slots, 0.2)
    big = fine_forward(qt, kt, vt, *args, chunk_bytes=2**40)
    small = fine_forward(qt, kt, vt, *args, chunk_bytes=1)  # one query tile per thread
    torch.testing.assert_close(big, small, rtol=1e-6, atol=1e-6)
    gb = fine_backward(plan.tile(do), qt, kt, vt, *big, *args, chunk_bytes=2**40)
    gs = fine_backward(plan.tile(do), qt, kt, vt, *big, *args, chunk_bytes=1)
    torch.testing.assert_close(gb, gs, rtol=1e-5, atol=1e-6)


def _masked_fine_oracle(q_t, k_t, v_t, idx, plan, scale):
    """Fine stage as dense masked attention in the tiled layout (float64): query slot i of
    tile a sees key slot j of tile b iff b is selected by a and j is a valid slot."""
    n, slots = plan.num_tiles, plan.slots
    tile_sel = torch.zeros(*idx.shape[:2], n, n, dtype=torch.bool)
    tile_sel.scatter_(-1, idx.long(), True)  # [B, H, N(q), N(k)]
    allowed = tile_sel.repeat_interleave(slots, 2).repeat_interleave(slots, 3)
    allowed &= plan.slot_valid.view(1, 1, 1, -1)
    s = (q_t @ k_t.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v_t, torch.logsumexp(s, -1)


@pytest.mark.parametrize("chunk_bytes", [1, 2**40])
@pytest.mark.parametrize("k_sel", [3, "all"])
def test_torch_fine_stage_pad_rows_lse_and_grads(chunk_bytes, k_sel):
    """Partial edge tiles: valid rows match dense masked attention (out, lse, dq, dk, dv);
    pad query rows get out = lse = dq = 0 and their dO never reaches dk / dv. ("all": the
    full selection, which the public API sends to dense SDPA instead.)"""
    grid, tile, B, H, D = (3, 5, 7), (4, 4, 4), 2, 2, 16
    plan = get_tile_plan(grid, tile)
    n = plan.num_tiles
    k_sel = n if k_sel == "all" else k_sel
    g = torch.Generator().manual_seed(4)
    q, k, v, do = _qkv(B, H, math.prod(grid), D, scale=3.0, seed=5, n=4)
    qt, kt, vt = (plan.tile(x).requires_grad_() for x in (q, k, v))
    idx = torch.stack([torch.randperm(n, generator=g)[:k_sel] for _ in range(B * H * n)])
    idx = idx.sort(-1).values.view(B, H, n, k_sel).to(torch.int32)
    args = (idx, plan.counts, plan.slots, 0.3)
    valid, pad = plan.slot_valid, ~plan.slot_valid
    assert pad.any()  # the grid leaves partial tiles

    out, lse = fine_forward(qt.detach(), kt.detach(), vt.detach(), *args, chunk_bytes=chunk_bytes)
    ref_out, ref_lse = _masked_fine_oracle(qt, kt, vt, idx, plan, 0.3)
    torch.testing.assert_close(out[:, :, valid], ref_out[:, :, valid].detach())
    torch.testing.assert_close(lse[:, :, valid], ref_lse[:, :, valid].detach())
    assert not out[:, :, pad].any() and not lse[:, :, pad].any()
    out2, no_lse = fine_forward(
        qt.detach(), kt.detach(), vt.detach(), *args, chunk_bytes=chunk_bytes, with_lse=False
    )
    # bit-equal by construction: the same softmax kernel on the same scores either way
    assert torch.equal(out2, out) and no_lse.shape == (B, H, 0)

    do_t = plan.tile(do)  # pad rows hold zeros; garbage there must not matter
    noisy = do_t.clone()
    noisy[:, :, pad] = 1e3 * torch.randn(B, H, int(pad.sum()), D, generator=g, dtype=do.dtype)
    ref = torch.autograd.grad(ref_out[:, :, valid], (qt, kt, vt), do_t[:, :, valid])
    for d in (do_t, noisy):
        got = fine_backward(
            d, qt.detach(), kt.detach(), vt.detach(), out, lse, *args, chunk_bytes=chunk_bytes
        )
        assert not got[0][:, :, pad].any()  # dq of pad rows
        for name, a, b in zip(("dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, b, msg=name)


def test_torch_fine_stage_keeps_batches_and_heads_apart():
    """A non-finite key in one (batch, head) reaches no other one, also through the padded
    key columns of chunks whose rows gather different numbers of keys."""
    grid, tile, B, H, D, k_sel = (3, 5, 4), (2, 2, 2), 2, 2, 8, 3
    plan = get_tile_plan(grid, tile)
    n = plan.num_tiles
    g = torch.Generator().manual_seed(6)
    q, k, v, do = (plan.tile(x) for x in _qkv(B, H, math.prod(grid), D, seed=6, n=4))
    idx = torch.stack([torch.randperm(n, generator=g)[:k_sel] for _ in range(B * H * n)])
    idx = idx.sort(-1).values.view(B, H, n, k_sel).to(torch.int32)
    args = (idx, plan.counts, plan.slots, 0.5)
    for bad in (float("nan"), float("inf")):
        k_bad = k.clone()
        k_bad[0, 0, 0] = bad  # batch 0, head 0, first token
        for chunk_bytes in (1, 2**40):  # one row per thread; one chunk for all rows
            out, lse = fine_forward(q, k_bad, v, *args, chunk_bytes=chunk_bytes)
            dq, dk, dv = fine_backward(do, q, k_bad, v, out, lse, *args, chunk_bytes=chunk_bytes)
            others = [(b, h) for b in range(B) for h in range(H) if (b, h) != (0, 0)]
            for b, h in others:
                for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                    assert torch.isfinite(t[b, h]).all(), (bad, chunk_bytes, b, h, name)


def test_torch_fine_stage_takes_strided_inputs():
    """Non-contiguous q/k/v/dO (views into wider tensors) give the contiguous results."""
    grid, D = (2, 4, 4), 16  # whole tiles: the tile-gather path views [tiles, slots * D]
    plan = get_tile_plan(grid, (2, 2, 2))
    n = plan.num_tiles
    wide = [plan.tile(x) for x in _qkv(1, 2, math.prod(grid), 2 * D, seed=8, n=4)]
    strided = [x[..., :D] for x in wide]
    dense = [x.contiguous() for x in strided]
    idx = torch.arange(n).view(1, 1, n, 1).expand(1, 2, n, 1).flip(2).contiguous().int()
    args = (idx, plan.counts, plan.slots, 0.25)
    # Bit-equal by construction: fine_forward / fine_backward make their inputs contiguous
    # first, so both calls run the same ops on the same values.
    out, lse = fine_forward(*strided[:3], *args)
    ref_out, ref_lse = fine_forward(*dense[:3], *args)
    assert torch.equal(out, ref_out)
    got = fine_backward(strided[3], *strided[:3], out, lse, *args)
    ref = fine_backward(dense[3], *dense[:3], ref_out, ref_lse, *args)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    grid = (3, 5, 7)
    q, k, v, g = _qkv(1, 2, 105, 32, seed=10, dtype=torch.float32, n=4)

    def f(q, k, v, g):
        return video_sparse_attention(q, k, v, grid=grid, sparsity=0.5, gate=g, backend="torch")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    out = compiled(*leaves)
    torch.testing.assert_close(out, f(q, k, v, g))
    out.square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    f(*ref_leaves).square().sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------- errors

Q = torch.zeros(1, 2, 105, 16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(3, 5, 6), sparsity=0.5), "grid"),
        (dict(grid=(3, 5), sparsity=0.5), "grid"),
        (dict(grid=(3, 5, 7), tile_size=(4, 0, 4), sparsity=0.5), "tile_size"),
        (dict(grid=(3, 5, 7), tile_size=(4, -1, 4), sparsity=0.5), "tile_size"),
        (dict(grid=(3, 5, 7), sparsity=1.0), "sparsity"),
        (dict(grid=(3, 5, 7), sparsity=-0.1), "sparsity"),
        (dict(grid=(3, 5, 7), topk=0), "topk"),
        (dict(grid=(3, 5, 7), topk=99), "topk"),
        (dict(grid=(3, 5, 7), topk=2, sparsity=0.5), "exactly one"),
        (dict(grid=(3, 5, 7)), "exactly one"),
        (dict(grid=(3, 5, 7), sparsity=0.5, gate=torch.zeros(1, 2, 104, 16)), "gate"),
        (dict(grid=(3, 5, 7), sparsity=0.5, gate=torch.zeros(1, 2, 105, 16).double()), "gate"),
        (dict(grid=(3, 5, 7), sparsity=0.5, backend="cuda"), "backend"),
        # non-finite and out-of-range numbers (issue 15): refused, naming the valid range
        (dict(grid=(3, 5, 7), sparsity=float("nan")), r"sparsity must be a number in \[0, 1\)"),
        (dict(grid=(3, 5, 7), sparsity=float("inf")), r"sparsity must be a number in \[0, 1\)"),
        (dict(grid=(3, 5, 7), sparsity=True), "sparsity"),
        (dict(grid=(3, 5, 7), sparsity="0.5"), "sparsity"),
        (dict(grid=(3, 5, 7), topk=2.0), "topk"),
        (dict(grid=(3, 5, 7), topk=True), "topk"),
        (dict(grid=(3, 5, 7), tile_size=(4, float("inf"), 4), sparsity=0.5), "tile_size"),
        (dict(grid=(3, 5, 7), tile_size=(4, float("nan"), 4), sparsity=0.5), "tile_size"),
        (dict(grid=(3, 5, 7), tile_size=(True, 4, 4), sparsity=0.5), "tile_size"),
        (dict(grid=(3, 5, 7), tile_size="444", sparsity=0.5), "tile_size"),
        (dict(grid=(3, 5, float("inf")), sparsity=0.5), "grid"),
        (
            dict(grid=(3, 5, 7), sparsity=0.5, scale=float("inf")),
            "scale must be a finite number > 0",
        ),
        (dict(grid=(3, 5, 7), sparsity=0.5, scale=float("-inf")), "scale"),
        (dict(grid=(3, 5, 7), sparsity=0.5, scale=float("nan")), "scale"),
        (dict(grid=(3, 5, 7), sparsity=0.5, scale=0.0), "scale"),
        (dict(grid=(3, 5, 7), sparsity=0.5, scale=-0.25), "scale"),
        (dict(grid=(3, 5, 7), sparsity=0.5, scale="0.25"), "scale"),
        (dict(grid=(3, 5, 7), sparsity=0.5, scale=True), "scale"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        video_sparse_attention(Q, Q, Q, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_numeric_arguments_of_numpy_and_python_types(backend):
    """numpy scalars are numbers too; an int scale is a float scale."""
    np = pytest.importorskip("numpy")
    q, k, v = _qkv(1, 2, 105, 16, seed=13, dtype=torch.float32)
    kw = dict(grid=(3, 5, 7), backend=backend)
    ref = video_sparse_attention(q, k, v, sparsity=0.5, scale=1.0, **kw)
    for extra in (
        dict(sparsity=np.float32(0.5), scale=1),
        dict(sparsity=np.float64(0.5), scale=np.float32(1.0)),
        dict(topk=np.int64(2), scale=1.0),
    ):
        got = video_sparse_attention(q, k, v, **extra, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=str(extra))


@pytest.mark.parametrize(
    "k,v,match",
    [
        (torch.zeros(1, 2, 104, 16), Q, "k has shape"),
        (Q, torch.zeros(1, 2, 105, 8), "v has shape"),
        (Q.double(), Q, "k has dtype"),
        (Q, Q.to(torch.int64), "floating-point"),
        (Q[0], Q, "shape \\[B, H, S, D\\]"),
    ],
)
def test_mismatched_tensors_raise(k, v, match):
    with pytest.raises(ValueError, match=match):
        video_sparse_attention(Q, k, v, grid=(3, 5, 7), sparsity=0.5)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        video_sparse_attention(Q, Q, Q, grid=(3, 5, 7), sparsity=0.5, backend="triton")


def test_reference_refuses_huge_masks():
    big = torch.zeros(1, 1, 32760, 8)
    with pytest.raises(ValueError, match="backend='torch'"):
        video_sparse_attention(big, big, big, grid=(21, 30, 52), sparsity=0.9, backend="reference")


# ------------------------------------------------------------------------------ flex


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(
    "grid,tile,sparsity", [((3, 5, 7), (4, 4, 4), 0.5), ((5, 6, 9), (2, 3, 3), 0.8)]
)
def test_flex_forward_matches_reference(grid, tile, sparsity):
    q, k, v, g = _qkv(2, 2, math.prod(grid), 32, seed=11, dtype=torch.float32, n=4)
    out, idx = video_sparse_attention(
        q,
        k,
        v,
        grid=grid,
        tile_size=tile,
        sparsity=sparsity,
        gate=g,
        backend="flex",
        return_indices=True,
    )
    # float32 (flex) and float64 (reference) coarse scores select the same tiles only
    # because no row is near a tie
    assert_clear_selection(q, k, grid, tile, idx.shape[-1], min_gap=1e-4)
    ref, ref_idx = vsa_reference(
        q.double(),
        k.double(),
        v.double(),
        grid=grid,
        tile_size=tile,
        topk=idx.shape[-1],
        gate=g.double(),
    )
    assert torch.equal(idx, ref_idx)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_flex_backward_on_cpu_is_a_clear_error():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 105, 16, dtype=torch.float32))
    out = video_sparse_attention(q, k, v, grid=(3, 5, 7), sparsity=0.5, backend="flex")
    with pytest.raises(ValueError, match="backend='torch'"):
        out.sum().backward()
