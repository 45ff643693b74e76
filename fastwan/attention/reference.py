"""Dense, masked, float32 VSA: the oracle the other backends are tested against.

It shares nothing with the fast path but the tie rule of top-k: tile membership comes from
token coordinates, means from per-tile sums, the selection from rank counting, and the fine
stage from a materialised ``[B, H, S, S]`` block mask. Small shapes only.

Non-finite inputs follow the rule of ``video_sparse_attention``: a token takes part only in
the tiles it belongs to (its tile's mean, the queries that selected its tile), so means are
per-tile sums (a membership matmul would spread ``0 * nan`` to every tile) and the fine
stage's ``P @ V`` ignores unselected keys exactly (:func:`masked_pv`).
"""

from __future__ import annotations

import math

import torch

MAX_MASK_ELEMENTS = 2**28  # the [B, H, S, S] mask: 1 GiB of float32 scores


def token_tiles(grid, tile_size) -> tuple[torch.Tensor, int]:
    """Tile id of every raster token from its (t, h, w) coordinates, and the tile count."""
    T, H, W = grid
    tt, th, tw = tile_size
    nh, nw = -(-H // th), -(-W // tw)
    n = -(-T // tt) * nh * nw
    ids = [
        ((t // tt) * nh + h // th) * nw + w // tw
        for t in range(T)
        for h in range(H)
        for w in range(W)
    ]
    return torch.tensor(ids, dtype=torch.long), n


def topk_by_rank(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[.., N]`` mask of the k best entries per row; ties go to the lower index.

    Entry j is selected when fewer than k entries beat it, where i beats j if
    s_i > s_j, or s_i == s_j and i < j. A nan score counts as ``+inf``.
    """
    scores = torch.where(torch.isnan(scores), float("inf"), scores)
    n = scores.shape[-1]
    si = scores.unsqueeze(-1)  # [.., N(i), 1]
    sj = scores.unsqueeze(-2)  # [.., 1, N(j)]
    lower = torch.arange(n).view(n, 1) < torch.arange(n).view(1, n)  # i < j
    beats = (si > sj) | ((si == sj) & lower.to(scores.device))
    return beats.sum(-2) < k


def masked_pv(p: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p @ v`` in which only the ``allowed`` (query, key) pairs take part.

    p: ``[.., Sq, Sk]`` attention probabilities (0 off ``allowed``); allowed: bool, the
    same shape; v: ``[.., Sk, D]``. A plain matmul lets a key outside ``allowed`` reach every
    query through ``0 * nan = nan`` and ``0 * inf = nan``. Here the allowed pairs follow
    IEEE arithmetic as a matmul over the allowed keys alone does (a nan value, or an
    infinite one with probability 0, gives nan; ``+-inf`` with a positive probability gives
    ``+-inf``, and both signs nan), and the others contribute nothing.
    """
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return p @ v
    return with_nonfinite_values(p @ torch.where(finite, v, 0.0), p, allowed, v)


def with_nonfinite_values(
    out: torch.Tensor, p: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Puts the non-finite entries of ``v`` back into ``out = p @ v_finite`` (``v`` with them
    zeroed), by the rule of :func:`masked_pv`: only the ``allowed`` pairs see them."""

    def hit(pairs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # any pair meets one
        return (pairs.to(v.dtype) @ values.to(v.dtype)) > 0  # [.., Sq, D]

    live = allowed & (p != 0)  # a nan p counts: its row is nan through ``out`` already
    nan = hit(allowed, torch.isnan(v)) | hit(allowed & (p == 0), torch.isinf(v))
    out = torch.where(hit(live, v == float("inf")), out + float("inf"), out)
    out = torch.where(hit(live, v == float("-inf")), out - float("inf"), out)  # inf - inf
    return out.masked_fill(nan, float("nan"))


def vsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid,
    tile_size=(4, 4, 4),
    topk: int,
    gate: torch.Tensor | None = None,
    scale: float | None = None,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference VSA on ``[B, H, S, D]`` inputs, computed in float32 (float64 for float64).

    ``indices`` ([B, H, N, k]) forces a selection (to compare kernels given the same
    tiles); by default the top-``topk`` tiles of the coarse scores are chosen. Returns the
    output in the input dtype and the selected indices ``[B, H, N, k]`` (ascending).
    """
    B, H, S, D = q.shape
    if B * H * S * S > MAX_MASK_ELEMENTS:
        raise ValueError(
            f"backend='reference' materialises a [B, H, S, S] = [{B}, {H}, {S}, {S}] mask; "
            "use backend='torch' for sequences this long"
        )
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    tile_of, n = token_tiles(grid, tile_size)
    tile_of = tile_of.to(q.device)
    count = torch.bincount(tile_of, minlength=n).to(acc).view(n, 1)  # [N, 1]

    def means(x):  # [B, H, S, D] -> [B, H, N, D]: each token reaches its own tile only
        return x.new_zeros(B, H, n, D).index_add_(2, tile_of, x) / count

    qc, kc, vc = means(qf), means(kf), means(vf)  # [B, H, N, D]
    scores_c = qc @ kc.transpose(-1, -2) * scale  # [B, H, N, N]

    if indices is None:
        chosen = topk_by_rank(scores_c, topk)  # [B, H, N, N]
        indices = torch.nonzero(chosen)[:, -1].view(B, H, n, topk)
    else:
        chosen = torch.zeros(B, H, n, n, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, indices.long(), True)

    mask = chosen[:, :, tile_of][:, :, :, tile_of]  # [B, H, S, S]
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    out = masked_pv(p, mask, vf)
    if gate is not None:
        coarse = torch.softmax(scores_c, dim=-1) @ vc  # [B, H, N, D]
        out = out + gate.to(acc) * coarse[:, :, tile_of]
    return out.to(q.dtype), indices
