"""Runs FastVideo's VSA (its Triton kernels, under the Triton interpreter) against fastwan's
VSA on small shapes and prints the measured errors as JSON; tests/test_peer_vsa.py starts
it in a subprocess (TRITON_INTERPRET=1 and a Triton the peer's kernels run on, set before
Python starts) and asserts on them.

Independent of the benchmark's own check: the oracle is ``vsa_reference`` in float64 at
fastwan's selection, the budget PyTorch's own bfloat16 VSA written out here (math-backend
SDPA under the block mask, plus the coarse branch in torch ops).

    python -m tests._peer_worker PEER_SRC BENCH_JSON

It then runs ``fastwan bench attention --peer fastvideo --peer-src PEER_SRC`` on one tiny
case (the same process: its kernels are already rewritten by the interpreter) and writes
its report to BENCH_JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastwan.attention import (
    get_tile_plan,
    num_selected_tiles,
    video_sparse_attention,
    vsa_reference,
)
from fastwan.bench.peer import PeerVSA, interpreter_fidelity, mask_from_indices, separable_inputs
from tests._rules import attention_outputs_and_grads, rel_err, round_to

NAMES = ("out", "dq", "dk", "dv", "dgate")


def torch_bf16_vsa(q, k, v, gate, grid, tiles):
    """PyTorch's own VSA at the inputs' dtype: [B, H, S, D] raster, ``tiles`` [B, H, N, N]."""
    plan = get_tile_plan(grid)
    tt = plan.token_tile
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=tiles[:, :, tt][:, :, :, tt])
    if gate is None:
        return out
    qc, kc, vc = plan.tile_mean(q), plan.tile_mean(k), plan.tile_mean(v)
    coarse = torch.softmax(qc @ kc.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ vc
    return out + gate * coarse[:, :, tt]


def case(peer: PeerVSA, grid, sparsity: float, gated: bool, seed: int) -> dict:
    B, H, D = 1, 1, 32
    layout = peer.layout(grid, torch.device("cpu"))
    n = layout.num_tiles
    k_sel = num_selected_tiles(n, sparsity)
    rng = torch.Generator().manual_seed(seed)
    q, k, v, g = separable_inputs(B, H, grid, D, k_sel, rng)
    do = torch.randn(q.shape, generator=rng)
    # float64 copies of the bfloat16 inputs: the oracle sees what the kernels see
    q, k, v, g, do = round_to(torch.bfloat16, q, k, v, g, do)
    low = [t.bfloat16() for t in (q, k, v, g)]
    extra64, extra16 = ((g,), (low[3],)) if gated else ((), ())

    def gate_of(rest):
        return rest[0] if rest else None

    with torch.no_grad():
        _, idx = video_sparse_attention(
            *low[:3], grid=grid, topk=k_sel, gate=gate_of(extra16), backend="triton",
            return_indices=True,
        )  # fmt: skip
        peer_p = [layout.to_peer(t) for t in low[:3]]
        _, peer_tiles = peer.coarse(*peer_p, layout, k_sel)
    tiles = mask_from_indices(idx, n)

    def fastwan(q, k, v, *rest):
        return video_sparse_attention(
            q, k, v, grid=grid, topk=k_sel, gate=gate_of(rest), backend="triton"
        )

    def fastvideo(q, k, v, *rest):
        # gate 0: the peer always adds gate * coarse (gate 1 when None); 0 leaves its
        # fine stage alone, exactly (0 * finite = 0)
        gate = rest[0] if rest else torch.zeros_like(q)
        q_p, k_p, v_p, g_p = (layout.to_peer(t) for t in (q, k, v, gate))
        return layout.from_peer(peer.triton_vsa(q_p, k_p, v_p, g_p, layout, k_sel))

    got = {
        "fastwan": attention_outputs_and_grads(fastwan, *low[:3], do.bfloat16(), extra16),
        "peer": attention_outputs_and_grads(fastvideo, *low[:3], do.bfloat16(), extra16),
    }
    oracle = attention_outputs_and_grads(
        lambda q, k, v, *r: vsa_reference(
            q, k, v, grid=grid, topk=k_sel, gate=gate_of(r), indices=idx
        )[0],
        q, k, v, do, extra64,
    )  # fmt: skip
    budget = attention_outputs_and_grads(
        lambda q, k, v, *r: torch_bf16_vsa(q, k, v, gate_of(r), grid, tiles),
        *low[:3], do.bfloat16(), extra16,
    )  # fmt: skip
    return {
        "grid": list(grid),
        "gated": gated,
        "topk": k_sel,
        "num_tiles": n,
        "same_tiles": bool(torch.equal(tiles, peer_tiles)),
        "selected_per_row": tiles.sum(-1).unique().tolist(),
        "budget": {nm: rel_err(a, r) for nm, a, r in zip(NAMES, budget, oracle)},
        "errors": {
            who: {nm: rel_err(a, r) for nm, a, r in zip(NAMES, outs, oracle)}
            for who, outs in got.items()
        },
        # the peer against fastwan directly
        "between": {nm: rel_err(a, b) for nm, a, b in zip(NAMES, got["peer"], got["fastwan"])},
        "finite": all(bool(torch.isfinite(t).all()) for outs in got.values() for t in outs),
        "dtypes": sorted({str(t.dtype) for outs in got.values() for t in outs}),
    }


def main(src: str, bench_json: str) -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1", "start with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    peer = PeerVSA(src)
    grid = (5, 6, 9)  # 2 x 2 x 3 tiles, partial along every axis
    layout = peer.layout(grid, torch.device("cpu"))
    report = {
        "version": peer.version,
        # the peer's padded slot of every raster token == fastwan's tiled position
        "layout_matches": bool(
            torch.equal(layout.raster_slot(), get_tile_plan(grid, slots=64).scatter_index)
        ),
    }
    with interpreter_fidelity():
        report["cases"] = [
            case(peer, grid, 0.75, gated=True, seed=0),
            case(peer, grid, 0.75, gated=False, seed=1),
        ]
    from fastwan.cli import main as cli

    cli(
        ["bench", "attention", "--peer", "fastvideo", "--peer-src", src, "--grids", "5x6x9",
         "--sparsities", "0.9", "--modes", "fwd+bwd", "--backend", "triton", "--json", bench_json]
    )  # fmt: skip
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
