"""Tiling of a raster-ordered video token grid into VSA tiles.

A grid (T, H, W) of tokens in raster order is cut into tiles of ``tile_size`` (t, h, w).
Tiles are ordered t, h, w; inside a tile the tokens keep raster order. Edge tiles are
partial: each tile owns ``slots`` positions in the tiled layout, its valid tokens first,
then padding. A plan is computed once per (grid, tile_size, slots, device) and cached.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

Triple = tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Index plan between raster order ``[.., S, D]`` and tiled order ``[.., N * slots, D]``."""

    grid: Triple
    tile_size: Triple
    slots: int  # positions per tile in the tiled layout (>= tokens of a full tile)
    tiles_per_dim: Triple
    gather_index: torch.Tensor  # [N * slots] int64: raster token of each slot (pads repeat)
    slot_valid: torch.Tensor  # [N * slots] bool
    scatter_index: torch.Tensor  # [S] int64: slot of each raster token
    token_tile: torch.Tensor  # [S] int64: tile of each raster token
    counts: torch.Tensor  # [N] int32: valid tokens per tile
    slot_weight: torch.Tensor  # [N * slots] float32: 1 / count on valid slots, 0 on pads

    @property
    def num_tiles(self) -> int:
        return math.prod(self.tiles_per_dim)

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid)

    def tile(self, x: torch.Tensor) -> torch.Tensor:
        """``[.., S, D]`` raster -> ``[.., N * slots, D]`` tiled (pad slots hold a copy of a
        valid token of their tile; every consumer masks or discards them)."""
        return x.index_select(-2, self.gather_index)

    def untile(self, x_t: torch.Tensor) -> torch.Tensor:
        """``[.., N * slots, D]`` tiled -> ``[.., S, D]`` raster (pad slots dropped)."""
        return x_t.index_select(-2, self.scatter_index)

    def tile_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over each tile's valid tokens: ``[B, H, S, D]`` -> ``[B, H, N, D]``."""
        return self.tiled_mean(self.tile(x))

    def tiled_mean(self, x_t: torch.Tensor) -> torch.Tensor:
        """Mean over each tile's valid slots of a tiled ``[.., N * slots, D]`` tensor.

        A weighted sum over slots rather than ``index_add_``: CUDA's float atomics would
        make the result (and the backward) differ from run to run. Pad slots are zeroed
        after the weighting, not only weighted by 0: a pad holds a copy of a valid token,
        and ``0 * inf = nan`` would turn an infinite token's tile mean into nan.
        """
        w = self.slot_weight.to(x_t.dtype)
        x_tiles = x_t.unflatten(-2, (self.num_tiles, self.slots))  # [.., N, slots, D]
        weighted = x_tiles * w.view(self.num_tiles, self.slots, 1)
        if self.has_pads:  # in place on the product (mul saves its inputs, not its output)
            weighted = weighted.masked_fill_(self.pad_mask, 0.0)
        return weighted.sum(-2)

    @property
    def has_pads(self) -> bool:
        return self.slots * self.num_tiles != self.seq_len

    @property
    def pad_mask(self) -> torch.Tensor:
        """``[N, slots, 1]`` bool, True on pad slots."""
        return ~self.slot_valid.view(self.num_tiles, self.slots, 1)

    def broadcast_tiles(self, x_c: torch.Tensor) -> torch.Tensor:
        """Per-tile values ``[.., N, D]`` -> every slot of the tile ``[.., N * slots, D]``
        (``expand``: its backward is a reduction, deterministic on every device)."""
        shape = (*x_c.shape[:-1], self.slots, x_c.shape[-1])
        return x_c.unsqueeze(-2).expand(shape).flatten(-3, -2)


def tile_counts_per_dim(grid: Triple, tile_size: Triple) -> Triple:
    return tuple(-(-g // t) for g, t in zip(grid, tile_size))  # type: ignore[return-value]


def _extents(size: int, tile: int) -> torch.Tensor:
    """Tokens of each tile along one axis: ``tile``, the last one possibly fewer."""
    starts = torch.arange(0, size, tile)
    return torch.clamp(size - starts, max=tile)  # [n]


@functools.lru_cache(maxsize=64)
def _build_plan(grid: Triple, tile_size: Triple, slots: int, device: torch.device) -> TilePlan:
    # Static shapes and no data-dependent ops: under torch.compile this traces into the
    # graph without breaks.
    T, H, W = grid
    tt, th, tw = tile_size
    nt, nh, nw = tile_counts_per_dim(grid, tile_size)
    n_tiles = nt * nh * nw
    S = T * H * W

    t = torch.arange(T).view(T, 1, 1).expand(T, H, W).reshape(-1)
    h = torch.arange(H).view(1, H, 1).expand(T, H, W).reshape(-1)
    w = torch.arange(W).view(1, 1, W).expand(T, H, W).reshape(-1)
    token_tile = ((t // tt) * nh + h // th) * nw + w // tw  # [S]

    e_t, e_h, e_w = _extents(T, tt), _extents(H, th), _extents(W, tw)
    counts = (e_t.view(-1, 1, 1) * e_h.view(1, -1, 1) * e_w.view(1, 1, -1)).reshape(-1)  # [N]
    # A stable sort by tile keeps raster order inside each tile.
    order = torch.sort(token_tile, stable=True).indices  # [S] raster ids, grouped by tile
    starts = torch.cumsum(counts, 0) - counts  # [N]
    rank = torch.empty(S, dtype=torch.long)
    rank[order] = torch.arange(S) - starts[token_tile[order]]
    scatter_index = token_tile * slots + rank  # [S]

    slot_in_tile = torch.arange(slots).repeat(n_tiles)  # [N * slots]
    slot_tile = torch.arange(n_tiles).repeat_interleave(slots)
    slot_valid = slot_in_tile < counts[slot_tile]
    gather_index = torch.zeros(n_tiles * slots, dtype=torch.long)
    gather_index[scatter_index] = torch.arange(S)
    first_token = order[starts]  # [N] first raster token of each tile
    gather_index = torch.where(slot_valid, gather_index, first_token[slot_tile])

    return TilePlan(
        grid=grid,
        tile_size=tile_size,
        slots=slots,
        tiles_per_dim=(nt, nh, nw),
        gather_index=gather_index.to(device),
        slot_valid=slot_valid.to(device),
        scatter_index=scatter_index.to(device),
        token_tile=token_tile.to(device),
        counts=counts.to(torch.int32).to(device),
        slot_weight=(slot_valid / counts[slot_tile]).to(torch.float32).to(device),
    )


def get_tile_plan(
    grid: Triple, tile_size: Triple = (4, 4, 4), slots: int | None = None, device=None
) -> TilePlan:
    """Return the cached :class:`TilePlan` for ``grid`` cut into ``tile_size`` tiles.

    ``slots`` defaults to the tokens of a full tile; kernels that need power-of-two blocks
    ask for more.
    """
    grid = tuple(int(g) for g in grid)
    tile_size = tuple(int(t) for t in tile_size)
    if slots is None:
        slots = math.prod(tile_size)
    if slots < math.prod(tile_size):
        raise ValueError(
            f"slots={slots} is fewer than the {math.prod(tile_size)} tokens of a "
            f"{tile_size} tile; pass slots >= {math.prod(tile_size)} (or None)"
        )
    key = (grid, tile_size, int(slots), torch.device(device or "cpu"))
    if torch.compiler.is_compiling():
        # Dynamo traces the plan into the graph (index math on constants) either way; the
        # uncached builder says so, where the cached one warns that its cache is ignored.
        return _build_plan.__wrapped__(*key)
    return _build_plan(*key)


def slots_for(backend: str, tile_numel: int) -> int:
    """Tiled-layout positions per tile for a fine-stage backend.

    The block gather needs none beyond the tile; Triton's ``tl.dot``/``tl.arange`` (ours
    and FlexAttention's) need a power of two of at least 16.
    """
    if backend in ("triton", "flex"):
        return max(16, 1 << (tile_numel - 1).bit_length())
    return tile_numel


def num_selected_tiles(num_tiles: int, sparsity: float) -> int:
    """k = clamp(ceil((1 - sparsity) * num_tiles), 1, num_tiles)."""
    # Rounding first keeps float noise ((1 - 0.8) * 10 = 2.0000000000000004) from adding a tile.
    k = math.ceil(round((1.0 - sparsity) * num_tiles, 9))
    return max(1, min(num_tiles, k))


def select_topk_tiles(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` key tiles per query tile from pre-softmax coarse scores.

    scores: ``[B, H, N, N]``. Returns ``[B, H, N, k]`` int64 key-tile indices in ascending
    order. Ties go to the lower index: a stable descending sort keeps equal scores in index
    order. A nan score ranks as ``+inf`` (so a key tile holding a nan is selected, and the
    nan surfaces in the output as dense attention would show it, instead of being silently
    dropped); a row of nan scores (a nan query tile) selects tiles ``0 .. k-1``.
    """
    with torch.no_grad():
        scores = scores.masked_fill(torch.isnan(scores), float("inf"))
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.sort(top, dim=-1).values
