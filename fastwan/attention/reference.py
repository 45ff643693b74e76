"""Dense, masked, float32 VSA: the oracle the other backends are tested against.

It shares nothing with the fast path but the tie rule of top-k: tile membership comes from
token coordinates, means from a membership matrix, the selection from rank counting, and
the fine stage from a materialised ``[B, H, S, S]`` block mask. Small shapes only.
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
    s_i > s_j, or s_i == s_j and i < j.
    """
    n = scores.shape[-1]
    si = scores.unsqueeze(-1)  # [.., N(i), 1]
    sj = scores.unsqueeze(-2)  # [.., 1, N(j)]
    lower = torch.arange(n).view(n, 1) < torch.arange(n).view(1, n)  # i < j
    beats = (si > sj) | ((si == sj) & lower.to(scores.device))
    return beats.sum(-2) < k


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
    member = torch.nn.functional.one_hot(tile_of, n).T.to(acc)  # [N, S]
    member = member / member.sum(-1, keepdim=True)
    qc, kc, vc = member @ qf, member @ kf, member @ vf  # [B, H, N, D]
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
    out = p @ vf
    if gate is not None:
        coarse = torch.softmax(scores_c, dim=-1) @ vc  # [B, H, N, D]
        out = out + gate.to(acc) * coarse[:, :, tile_of]
    return out.to(q.dtype), indices
