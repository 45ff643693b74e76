"""VSA on non-finite inputs: every backend computes nan / inf through by the same rule as
the ``torch`` backend (see ``video_sparse_attention``'s docstring):

* a tile's coarse mean sees only its own tokens;
* a nan coarse score ranks as +inf, so a key tile holding a nan is selected everywhere;
* each query attends to its selected tiles as dense attention would, and keys of the
  tiles it did not select contribute nothing (also through 0 * nan or 0 * inf);
* the gate's coarse branch attends to every tile.

The torch backend is checked against these rules directly; reference, triton (the
interpreter on CPU) and flex are checked against the torch backend: the same selection,
nan and +-inf at the same positions, finite values close.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fastwan.attention import get_tile_plan, video_sparse_attention

# Partial tiles along w (9 = 4 + 4 + 1): tiles 2 and 5 hold 6 tokens, the others 24. The
# torch backend then gathers rows of different key counts (padded key columns) and
# triton / flex use 32 slots a tile (pad slots, copies of each tile's first token).
GRID, TILE, B, H, D, TOPK = (2, 6, 9), (2, 3, 4), 1, 2, 16, 2
S = math.prod(GRID)
PLAN = get_tile_plan(GRID, TILE)
N = PLAN.num_tiles
DIM = 3  # the planted element's channel
NAN, INF = float("nan"), float("inf")


def _inputs():
    """q, k, v, gate (float32), with per-tile offsets so that the top-2 selection has a
    clear margin: float rounding (another CPU, another backend's coarse means) cannot
    flip it."""
    g = torch.Generator().manual_seed(0)

    def offset():  # [B, H, S, D]: one random vector per tile
        return torch.randn(B, H, N, D, generator=g)[:, :, PLAN.token_tile]

    q = torch.randn(B, H, S, D, generator=g) + offset()
    k = torch.randn(B, H, S, D, generator=g) + offset()
    v = torch.randn(B, H, S, D, generator=g)
    gate = torch.randn(B, H, S, D, generator=g)
    return q, k, v, gate


Q, K, V, GATE = _inputs()


def _clean_selection():
    qc, kc = PLAN.tile_mean(Q.double()), PLAN.tile_mean(K.double())
    top = torch.sort(qc @ kc.transpose(-1, -2) / math.sqrt(D), -1, descending=True).values
    margin = (top[..., TOPK - 1] - top[..., TOPK]).min().item()
    assert margin > 1e-2, f"test data: top-{TOPK} margin {margin:.3g} is too small"
    return video_sparse_attention(
        Q, K, V, grid=GRID, tile_size=TILE, topk=TOPK, backend="torch", return_indices=True
    )[1]


IDX = _clean_selection()  # [B, H, N, k]
SELECTORS = {t: (IDX[0, 0] == t).any(-1) for t in range(N)}  # [N] query tiles selecting t
UNSELECTED = next(t for t in range(N) if not SELECTORS[t].any())  # in head 0
SELECTED = 5  # a partial tile: its first token fills the torch backend's pad key columns
assert 0 < int(SELECTORS[SELECTED].sum()) < N, "test data: tile 5 must be selected by some"


def _first_token(tile: int) -> int:
    """The first raster token of a tile: the one its pad slots copy."""
    return int((PLAN.token_tile == tile).nonzero()[0, 0])


def _plant(name: str, tile: int, value: float):
    """q, k, v with ``value`` at (batch 0, head 0, the tile's first token, channel DIM)."""
    tensors = {"q": Q.clone(), "k": K.clone(), "v": V.clone()}
    tensors[name][0, 0, _first_token(tile), DIM] = value
    return tensors["q"], tensors["k"], tensors["v"]


def _vsa(q, k, v, backend, gate=None, **kw):
    kw.setdefault("topk", TOPK)
    return video_sparse_attention(
        q, k, v, grid=GRID, tile_size=TILE, gate=gate, backend=backend, return_indices=True, **kw
    )


def _assert_same_nonfinite(got, want, what):
    for name, f in (("nan", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(f(got), f(want)), f"{what}: {name} at other positions"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-5, msg=what)


# (tensor, tile, value): k / v planted in a key tile that head 0's query tiles all skip or
# that some select; for q the tile only says where the query sits.
CASES = [
    (name, tile, value)
    for name in ("q", "k", "v")
    for tile in ("unselected", "selected")
    for value in (NAN, INF, -INF)
]


def _tile(where: str) -> int:
    return UNSELECTED if where == "unselected" else SELECTED


def _rows_of(tiles: torch.Tensor) -> torch.Tensor:
    """[S] bool: the tokens of the query tiles marked in ``tiles`` ([N] bool)."""
    return tiles[PLAN.token_tile]


# ------------------------------------------------------------ the rule, on torch


@pytest.mark.parametrize("where", ["unselected", "selected"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_torch_value_reaches_exactly_the_selecting_queries(where, value):
    """A nan / inf in v reaches channel DIM of the queries whose tile selected its tile
    (nan, or the inf itself: every probability there is > 0), nothing else."""
    tile = _tile(where)
    clean, _ = _vsa(Q, K, V, "torch")
    out, idx = _vsa(*_plant("v", tile, value), "torch")
    assert torch.equal(idx, IDX)  # values do not take part in the selection
    hit = _rows_of(SELECTORS[tile])  # [S]
    assert bool(hit.any()) == (where == "selected")
    expect = clean.clone()
    expect[0, 0, hit, DIM] = value
    _assert_same_nonfinite(out, expect, f"v={value} in the {where} tile")


def test_torch_nan_key_tile_is_selected_everywhere():
    """A nan key makes its tile's coarse scores nan, which rank first: every query tile of
    that head selects it and every one of its queries is nan (as in dense attention)."""
    out, idx = _vsa(*_plant("k", UNSELECTED, NAN), "torch")
    assert (idx[0, 0] == UNSELECTED).any(-1).all()
    assert torch.equal(idx[0, 1], IDX[0, 1])
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1]).all()


def test_torch_inf_key_reaches_the_queries_it_scores_plus_inf():
    """+inf in a key's channel DIM: query tiles whose coarse score for its tile is +inf
    (qc[DIM] > 0) select it; in those, queries with q[DIM] > 0 score it +inf (a nan row,
    as dense softmax gives), queries with q[DIM] < 0 score it -inf and ignore it."""
    tile = UNSELECTED
    out, idx = _vsa(*_plant("k", tile, INF), "torch")
    qc = PLAN.tile_mean(Q)[0, 0, :, DIM]  # [N]
    assert (qc.abs() > 1e-3).all() and (Q[0, 0, :, DIM].abs() > 1e-6).all()  # clear signs
    assert torch.equal((idx[0, 0] == tile).any(-1), qc > 0)
    nan_rows = _rows_of(qc > 0) & (Q[0, 0, :, DIM] > 0)  # [S]
    assert nan_rows.any() and not nan_rows.all()
    assert torch.equal(torch.isnan(out[0, 0]).any(-1), nan_rows)
    assert torch.isnan(out[0, 0, nan_rows]).all() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("value", [NAN, INF])
def test_torch_nonfinite_query_spoils_its_own_row_only(value):
    """A nan / inf query token: its own output row is nan (its scores are nan or +-inf),
    every other query is finite; a nan query tile selects tiles 0 .. k-1."""
    tile = SELECTED
    out, idx = _vsa(*_plant("q", tile, value), "torch")
    row = torch.zeros(S, dtype=torch.bool)
    row[_first_token(tile)] = True
    assert torch.isnan(out[0, 0, row]).all()
    assert torch.isfinite(out[0, 0, ~row]).all() and torch.isfinite(out[0, 1]).all()
    if value != value:  # nan
        assert idx[0, 0, tile].tolist() == list(range(TOPK))


def test_gate_coarse_branch_sees_every_tile():
    """With a gate, the dense coarse branch carries an unselected tile's nan value to
    channel DIM of every query of that head (softmax over all tiles @ tile means)."""
    out, _ = _vsa(*_plant("v", UNSELECTED, NAN), "torch", gate=GATE)
    assert torch.isnan(out[0, 0, :, DIM]).all()
    others = torch.ones(D, dtype=torch.bool)
    others[DIM] = False
    assert torch.isfinite(out[0, 0][:, others]).all() and torch.isfinite(out[0, 1]).all()


# ----------------------------------------------------- the other backends vs torch


@functools.cache
def _flex_unavailable() -> str | None:
    """Why backend='flex' cannot run here (None: it can)."""
    try:
        from fastwan.attention import flex_backend  # noqa: F401
    except ImportError as e:
        return f"FlexAttention is not importable here: {e}"
    try:
        _vsa(Q, K, V, "flex")
    except (NotImplementedError, RuntimeError) as e:
        return f"FlexAttention does not run on {Q.device.type} here: {type(e).__name__}: {e}"
    return None


def _backend_or_skip(backend: str):
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton backend needs the triton package")
        import os

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton on CPU needs TRITON_INTERPRET=1 (conftest.py sets it)")
    if backend == "flex" and _flex_unavailable():
        pytest.skip(_flex_unavailable())


BACKENDS = ["reference", "triton", "flex"]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,where,value", CASES)
def test_backend_agrees_with_torch(backend, name, where, value):
    _backend_or_skip(backend)
    inputs = _plant(name, _tile(where), value)
    want, want_idx = _vsa(*inputs, "torch")
    got, got_idx = _vsa(*inputs, backend)
    assert torch.equal(got_idx, want_idx), "the selection differs"
    _assert_same_nonfinite(got, want, f"{backend}: {name}={value} in the {where} tile")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,value,kw",
    [
        ("v", NAN, dict(gate=GATE)),  # the coarse branch: every query
        ("k", INF, dict(gate=GATE)),
        ("v", INF, dict(topk=None, sparsity=0.0)),  # full selection: dense attention
        ("k", NAN, dict(topk=None, sparsity=0.0)),
    ],
)
def test_backend_agrees_with_torch_gate_and_dense(backend, name, value, kw):
    _backend_or_skip(backend)
    inputs = _plant(name, UNSELECTED, value)
    want, want_idx = _vsa(*inputs, "torch", **kw)
    got, got_idx = _vsa(*inputs, backend, **kw)
    assert torch.equal(got_idx, want_idx), "the selection differs"
    _assert_same_nonfinite(got, want, f"{backend}: {name}={value}, {kw}")


# -------------------------------------------------------------------- gradients


def _grads(inputs, backend):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out, _ = _vsa(*leaves, backend)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(out, leaves, do)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_unselected_value_gets_and_gives_no_gradient(backend, value):
    """A nan / inf value in a tile nobody selected: every gradient stays finite, and the
    planted token's dv is 0."""
    _backend_or_skip(backend)
    grads = _grads(_plant("v", UNSELECTED, value), backend)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(g).all(), name
    assert (grads[2][0, 0, _first_token(UNSELECTED)] == 0).all()


def test_triton_gradients_agree_with_torch():
    """A nan value in a selected tile: the same nan pattern in dq, dk, dv (the queries that
    selected it and the keys those queries attend to), finite values close."""
    _backend_or_skip("triton")
    inputs = _plant("v", SELECTED, NAN)
    want = _grads(inputs, "torch")
    got = _grads(inputs, "triton")
    assert torch.isnan(want[0]).any()  # the case is not vacuous
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        _assert_same_nonfinite(a, b, name)


def test_triton_fine_stage_matches_torch_on_a_tile_of_infinite_keys():
    """The fine stage alone, on a selection made to order: a query tile whose queries all
    score every key of its first selected tile -inf (those keys are +inf in channel DIM,
    the queries negative there). Dense attention ignores that tile: out and dk are finite
    (dq is nan: dS @ K meets 0 * inf). Triton's online softmax must not start from
    exp(-inf - -inf) = nan, and its pad query rows (which score an infinite key nan) must
    not spread nan into dk through delta."""
    _backend_or_skip("triton")
    from fastwan.attention import torch_backend, triton_backend

    plan = get_tile_plan(GRID, TILE, slots=triton_backend.slots_for(math.prod(TILE)))
    q, k, v, do = (plan.tile(x[:, :1].clone()) for x in (Q, K, V, GATE))  # [1, 1, N*32, D]
    valid = plan.slot_valid
    tile_of_slot = torch.arange(N).repeat_interleave(plan.slots)
    do[:, :, ~valid] = 0  # as TilePlan.untile's gradient gives
    k[0, 0, valid & (tile_of_slot == 0), DIM] = INF
    q[0, 0, tile_of_slot == 3, DIM] = -q[0, 0, tile_of_slot == 3, DIM].abs() - 0.1
    idx = torch.tensor([[1, 2]] * N, dtype=torch.int32)
    idx[3] = torch.tensor([0, 1])  # only query tile 3 selects the infinite keys
    args = (idx.view(1, 1, N, 2), plan.counts, plan.slots, D**-0.5)

    want_out, want_lse = torch_backend.fine_forward(q, k, v, *args)
    got_out, got_lse = triton_backend.fine_forward(q, k, v, *args)
    assert torch.isfinite(want_out).all()
    _assert_same_nonfinite(got_out[:, :, valid], want_out[:, :, valid], "out")
    want = torch_backend.fine_backward(do, q, k, v, want_out, want_lse, *args)
    got = triton_backend.fine_backward(do, q, k, v, got_out, got_lse, *args)
    assert torch.isnan(want[0]).any() and torch.isfinite(want[1]).all()
    for name, a, b in zip(("dq", "dk", "dv"), got, want):  # pad slots too: exact zeros
        _assert_same_nonfinite(a, b, name)
