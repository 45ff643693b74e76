"""Triton backend of the VSA fine stage.

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), which mishandles bfloat16 dots: float32 and
float16 are tested everywhere, bfloat16 only in the GPU tests. With a GPU the same tests run
the compiled kernels on CUDA. Shapes are small so that the interpreter stays fast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastwan.attention import torch_backend, video_sparse_attention, vsa_reference
from fastwan.attention.tiling import get_tile_plan, num_selected_tiles, select_topk_tiles
from tests._rules import FACTOR, attention_outputs_and_grads, dense_errors, rel_err, round_to

triton = pytest.importorskip("triton")
from fastwan.attention import triton_backend  # noqa: E402

# Inputs are drawn on CPU (reproducible) and moved here.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-4
GRIDS = [(3, 5, 7), (2, 6, 9)]
# 64 tokens -> 64 slots; 24 tokens -> 32 slots, and partial tiles along every axis of (3, 5, 7)
TILES = [(4, 4, 4), (2, 3, 4)]


def _tiled_case(grid, tile, B=2, H=2, D=64, sparsity=0.5, seed=0):
    """Random tiled q/k/v with garbage (large) pad rows, a random selection and a dO that is
    zero on pad rows (as the gradient of ``TilePlan.untile`` is)."""
    gen = torch.Generator().manual_seed(seed)
    slots = triton_backend.slots_for(math.prod(tile))
    plan = get_tile_plan(grid, tile, slots=slots)
    N = plan.num_tiles
    pad = ~plan.slot_valid  # [N * slots]
    q, k, v, do = (torch.randn(B, H, N * slots, D, generator=gen) for _ in range(4))
    for t in (q, k, v):  # pad content is arbitrary: the kernels must mask it
        t[:, :, pad] = 1e3 * torch.randn(B, H, int(pad.sum()), D, generator=gen)
    do[:, :, pad] = 0
    k_sel = num_selected_tiles(N, sparsity)
    idx = select_topk_tiles(torch.randn(B, H, N, N, generator=gen), k_sel)  # [B, H, N, k]
    plan = get_tile_plan(grid, tile, slots=slots, device=DEVICE)
    q, k, v, do, idx = (t.to(DEVICE) for t in (q, k, v, do, idx.to(torch.int32)))
    return plan, q, k, v, do, idx


def _randn(*shape, n, seed, scale=1.0):
    """``n`` float64 tensors on DEVICE, drawn on CPU."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE)
        for _ in range(n)
    ]


def _selection(q, k, **kwargs):
    """The key tiles ``video_sparse_attention`` selects for q, k (the coarse stage does not
    depend on the fine backend; the torch backend is the cheaper way to run it here).

    The Triton run computes its coarse means with its own kernel (another summation
    order); the test data keep every row's top-k boundary clear of float rounding, so
    both select these tiles on any CPU."""
    with torch.no_grad():
        idx = video_sparse_attention(q, k, k, backend="torch", return_indices=True, **kwargs)[1]
    plan = get_tile_plan(kwargs["grid"], kwargs.get("tile_size", (4, 4, 4)))
    k_sel = idx.shape[-1]
    if k_sel < plan.num_tiles:
        qc, kc = plan.tile_mean(q.double().cpu()), plan.tile_mean(k.double().cpu())
        s = qc @ kc.transpose(-1, -2)  # [B, H, N, N]
        top = torch.sort(s, -1, descending=True).values
        gap = (top[..., k_sel - 1] - top[..., k_sel]) / s.abs().amax((-1, -2), keepdim=True)[..., 0]
        assert gap.min() >= 1e-4, f"test data: top-{k_sel} margin {gap.min():.3g} is too small"
    return idx


@pytest.mark.parametrize("numel,slots", [(64, 64), (27, 32), (8, 16), (1, 16), (100, 128)])
def test_slots_for(numel, slots):
    assert triton_backend.slots_for(numel) == slots


def test_reverse_index_lists_every_pair_once():
    B, H, N, K = 2, 3, 7, 3
    gen = torch.Generator().manual_seed(1)
    idx = select_topk_tiles(torch.randn(B, H, N, N, generator=gen), K).to(DEVICE, torch.int32)
    offsets, q_tiles = triton_backend.build_reverse_index(idx, N)
    assert offsets.shape == (B * H * N + 1,) and q_tiles.shape == (B * H * N * K,)
    assert offsets[0] == 0 and offsets[-1] == B * H * N * K
    pairs = set()
    for bh in range(B * H):
        for kt in range(N):
            seg = q_tiles[offsets[bh * N + kt] : offsets[bh * N + kt + 1]].tolist()
            assert seg == sorted(seg)  # ascending: fixed accumulation order
            for n in seg:
                assert (bh, n, kt) not in pairs
                pairs.add((bh, n, kt))
    expected = {
        (bh, n, int(kt))
        for bh in range(B * H)
        for n in range(N)
        for kt in idx.view(B * H, N, K)[bh, n]
    }
    assert pairs == expected


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("D", [64, 40])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("grid", GRIDS)
def test_fine_matches_torch_backend_fp32(grid, tile, D, sparsity):
    plan, q, k, v, do, idx = _tiled_case(grid, tile, D=D, sparsity=sparsity)
    args = (idx, plan.counts, plan.slots, D**-0.5)
    out, lse = triton_backend.fine_forward(q, k, v, *args)
    ref_out, ref_lse = torch_backend.fine_forward(q, k, v, *args)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    valid = plan.slot_valid  # pad rows of out / lse are unspecified
    assert rel_err(out[:, :, valid], ref_out[:, :, valid]) < FP32_TOL
    assert rel_err(lse[:, :, valid], ref_lse[:, :, valid]) < FP32_TOL
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()

    grads = triton_backend.fine_backward(do, q, k, v, out, lse, *args)
    ref_grads = torch_backend.fine_backward(do, q, k, v, ref_out, ref_lse, *args)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == q.dtype
        assert rel_err(g, r) < FP32_TOL, name


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("D", [64, 40])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("grid", GRIDS)
def test_public_api_matches_reference_fp32(grid, tile, D, sparsity):
    """fp32 Triton through ``video_sparse_attention`` (gate included) vs the float64 oracle,
    given the same selection."""
    q, k, v, gate, do = _randn(2, 2, math.prod(grid), D, n=5, seed=2)
    common = dict(grid=grid, tile_size=tile, sparsity=sparsity)
    idx = _selection(q.float(), k.float(), **common)
    got = attention_outputs_and_grads(
        lambda q, k, v, g: video_sparse_attention(q, k, v, gate=g, backend="triton", **common),
        q.float(),
        k.float(),
        v.float(),
        do.float(),
        extra=(gate.float(),),
    )
    want = attention_outputs_and_grads(
        lambda q, k, v, g: vsa_reference(
            q, k, v, grid=grid, tile_size=tile, topk=idx.shape[-1], gate=g, indices=idx
        )[0],
        q,
        k,
        v,
        do,
        extra=(gate,),
    )
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgate"), got, want):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < FP32_TOL, name


@pytest.mark.parametrize("act_scale", [1.0, 10.0, 30.0])
@pytest.mark.parametrize("D", [64, 40])
def test_fp16_within_tolerance_rule(D, act_scale):
    """fp16 error vs the float64 oracle <= FACTOR x the error of dense SDPA at fp16."""
    grid, tile = (3, 5, 7), (4, 4, 4)
    q, k, v, do = _randn(2, 2, math.prod(grid), D, n=4, seed=3)
    # Representable at fp16, so both errors measure arithmetic, not input rounding (which a
    # near-tied softmax row can amplify far beyond either kernel's own error).
    q, k, v, do = round_to(torch.float16, q * act_scale, k * act_scale, v, do)
    h = [t.half() for t in (q, k, v)]
    idx = _selection(*h[:2], grid=grid, sparsity=0.5)
    got = attention_outputs_and_grads(
        lambda q, k, v: video_sparse_attention(q, k, v, grid=grid, sparsity=0.5, backend="triton"),
        *h,
        do.half(),
    )
    want = attention_outputs_and_grads(
        lambda q, k, v: vsa_reference(
            q, k, v, grid=grid, tile_size=tile, topk=idx.shape[-1], indices=idx
        )[0],
        q,
        k,
        v,
        do,
    )
    budget = dense_errors(q, k, v, do, torch.float16)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, want, budget):
        assert a.dtype == torch.float16 and torch.isfinite(a).all(), name
        assert rel_err(a, b) <= FACTOR * e, f"{name}: {rel_err(a, b):.3g} > {FACTOR} x {e:.3g}"


@pytest.mark.parametrize("D", [64, 40])
def test_sparsity_zero_equals_dense_sdpa(D):
    grid = (3, 5, 7)
    q, k, v, do = (t.float() for t in _randn(2, 2, math.prod(grid), D, n=4, seed=4))
    got = attention_outputs_and_grads(
        lambda q, k, v: video_sparse_attention(q, k, v, grid=grid, sparsity=0.0, backend="triton"),
        q,
        k,
        v,
        do,
    )
    want = attention_outputs_and_grads(F.scaled_dot_product_attention, q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < FP32_TOL, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic(dtype):
    plan, q, k, v, do, idx = _tiled_case((2, 6, 9), (2, 3, 4), D=40, sparsity=0.5, seed=5)
    q, k, v, do = (t.to(dtype) for t in (q.clamp(-8, 8), k.clamp(-8, 8), v, do))
    args = (idx, plan.counts, plan.slots, 40**-0.5)

    def run():
        out, lse = triton_backend.fine_forward(q, k, v, *args)
        return (out, lse, *triton_backend.fine_backward(do, q, k, v, out, lse, *args))

    # Bit-equal by design: every output row is written by one program in a fixed order
    # (no atomics), so two runs on one machine agree exactly; not a cross-machine check.
    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_pad_rows_do_not_leak():
    """Garbage in dO's pad rows changes nothing: pad query rows' outputs are discarded."""
    plan, q, k, v, do, idx = _tiled_case((2, 6, 9), (2, 3, 4), D=40, sparsity=0.5, seed=7)
    args = (idx, plan.counts, plan.slots, 40**-0.5)
    out, lse = triton_backend.fine_forward(q, k, v, *args)
    noisy = do.clone()
    noisy[:, :, ~plan.slot_valid] = 1e3
    clean_grads = triton_backend.fine_backward(do, q, k, v, out, lse, *args)
    noisy_grads = triton_backend.fine_backward(noisy, q, k, v, out, lse, *args)
    # Bit-equal by construction: pad rows of dO are masked to 0 on load, so both runs
    # compute on the same values; pad rows of dQ are stored as exact zeros.
    for a, b in zip(clean_grads, noisy_grads):
        assert torch.equal(a, b)
    assert (clean_grads[0][:, :, ~plan.slot_valid] == 0).all()  # pad rows of dQ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", TILES)
def test_fused_tile_mean_matches_torch(tile, dtype):
    """The fused tile mean (valid slots only, float32 accumulation, garbage pads ignored)
    and its gradient equal ``TilePlan.tiled_mean`` on a float32 copy."""
    from fastwan.attention.ops import TileMeanFunction

    plan, q, _, _, _, _ = _tiled_case((3, 5, 7), tile, D=40)
    x = q.to(dtype).clone().requires_grad_()
    got = TileMeanFunction.apply(x, plan.counts, plan.slot_weight, plan.slots)
    assert got.dtype == torch.float32 and got.shape == (2, 2, plan.num_tiles, 40)
    x_ref = q.to(dtype).clone().requires_grad_()
    ref = plan.tiled_mean(x_ref.float())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    dmean = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (dx,) = torch.autograd.grad(got, x, dmean)
    (dx_ref,) = torch.autograd.grad(ref, x_ref, dmean)
    assert dx.dtype == dtype
    torch.testing.assert_close(dx, dx_ref)
    with pytest.raises(ValueError, match="multiple of slots"):
        triton_backend.tile_mean(q[:, :, :-1], plan.counts, plan.slots)
    # schema, fake (torch.compile) implementation and dynamic-shape tracing of the op
    checks = torch.library.opcheck(
        torch.ops.fastwan.vsa_tile_mean.default, (q.to(dtype), plan.counts, plan.slots)
    )
    assert set(checks.values()) == {"SUCCESS"}, checks


def test_kernels_compile_for_nvidia_gpus_without_one():
    """Every kernel compiles to a cubin for sm_90 (H100/H200) and sm_89 (RTX 4090) in
    bfloat16, the GPU fast path (Triton's own ptxas; a subprocess, as the interpreter that
    conftest.py turns on replaces the kernels)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "check_triton_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(script), "--arch", "90", "89", "--dtype", "bf16"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    ok = [line for line in run.stdout.splitlines() if " ok (" in line]
    assert len(ok) == 2 * 4, run.stdout  # 2 archs x (fwd, dq, dkdv, tile mean)


def test_rejects_unsupported_inputs():
    plan, q, k, v, _, idx = _tiled_case((3, 5, 7), (4, 4, 4), B=1, H=1)
    with pytest.raises(ValueError, match="backend='torch'"):
        triton_backend.fine_forward(
            q.double(), k.double(), v.double(), idx, plan.counts, plan.slots, 0.125
        )
    with pytest.raises(ValueError, match="power of two"):
        triton_backend.fine_forward(q, k, v, idx, plan.counts, 48, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("act_scale", [1.0, 10.0])
@pytest.mark.parametrize("D", [128, 72])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_within_tolerance_rule(dtype, D, act_scale):
    """Compiled kernels on CUDA at a realistic tile and sparsity, larger grid with partial
    edge tiles; same tolerance rule as on CPU."""
    grid, tile, sparsity = (6, 20, 26), (4, 4, 4), 0.8
    q, k, v, do = _randn(1, 4, math.prod(grid), D, n=4, seed=6)
    q, k, v, do = round_to(dtype, q * act_scale, k * act_scale, v, do)
    low = [t.to(dtype) for t in (q, k, v)]
    common = dict(grid=grid, tile_size=tile, sparsity=sparsity)
    idx = _selection(*low[:2], **common)
    got = attention_outputs_and_grads(
        lambda q, k, v: video_sparse_attention(q, k, v, backend="triton", **common),
        *low,
        do.to(dtype),
    )
    want = attention_outputs_and_grads(
        lambda q, k, v: vsa_reference(
            q, k, v, grid=grid, tile_size=tile, topk=idx.shape[-1], indices=idx
        )[0],
        q,
        k,
        v,
        do,
    )
    budget = dense_errors(q, k, v, do, dtype)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, want, budget):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert rel_err(a, b) <= FACTOR * e, f"{name}: {rel_err(a, b):.3g} > {FACTOR} x {e:.3g}"


@pytest.mark.gpu
def test_gpu_fp32_matches_torch_backend():
    """Exact (non-TF32) fp32 dots on CUDA, compared with the torch backend."""
    plan, q, k, v, do, idx = _tiled_case((6, 20, 26), (4, 4, 4), B=2, H=3, D=72, sparsity=0.8)
    args = (idx, plan.counts, plan.slots, 72**-0.5)
    out, lse = triton_backend.fine_forward(q, k, v, *args)
    ref_out, ref_lse = torch_backend.fine_forward(q, k, v, *args)
    valid = plan.slot_valid
    assert rel_err(out[:, :, valid], ref_out[:, :, valid]) < FP32_TOL
    assert rel_err(lse[:, :, valid], ref_lse[:, :, valid]) < FP32_TOL
    grads = triton_backend.fine_backward(do, q, k, v, out, lse, *args)
    ref_grads = torch_backend.fine_backward(do, q, k, v, ref_out, ref_lse, *args)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(g, r) < FP32_TOL, name
