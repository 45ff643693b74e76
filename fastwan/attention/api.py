"""The public VSA function."""

from __future__ import annotations

import math
import numbers
import os

import torch
import torch.nn.functional as F

from fastwan.attention.ops import TileMeanFunction, VSAFineFunction
from fastwan.attention.reference import vsa_reference
from fastwan.attention.tiling import (
    get_tile_plan,
    num_selected_tiles,
    select_topk_tiles,
    slots_for,
    tile_counts_per_dim,
)
from fastwan.choices import ATTENTION_BACKENDS, check_choice


def _triple(name: str, value) -> tuple[int, int, int]:
    try:
        if isinstance(value, (str, bytes)) or any(isinstance(x, bool) for x in value):
            raise TypeError
        out = tuple(int(x) for x in value)
    except (TypeError, ValueError, OverflowError):  # a non-number, nan, inf
        raise ValueError(f"{name} must be three integers (t, h, w), got {value!r}") from None
    if len(out) != 3 or any(x != y for x, y in zip(out, value)):
        raise ValueError(f"{name} must be three integers (t, h, w), got {value!r}")
    if any(x <= 0 for x in out):
        raise ValueError(f"{name} must be positive in every dimension, got {value!r}")
    return out  # type: ignore[return-value]


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """``auto`` -> ``triton`` on CUDA when Triton is installed (float64 excepted), else
    ``torch``."""
    check_choice(backend, ATTENTION_BACKENDS, "backend")
    if backend == "auto":
        gpu = device.type == "cuda" and dtype != torch.float64 and triton_usable(device)
        return "triton" if gpu else "torch"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend='triton' needs a CUDA tensor and the triton package (got device "
            f"{device}); on CPU set TRITON_INTERPRET=1 before starting Python, or use "
            "backend='torch'"
        )
    return backend


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_scale(scale) -> float | None:
    """``None`` or a finite number > 0 (a tensor is not taken: ``float()`` of one would
    synchronise a GPU and break a ``torch.compile`` graph)."""
    if scale is None:
        return None
    if not _real(scale) or not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(
            f"scale must be a finite number > 0 (the softmax scale; None for 1 / sqrt(D)), "
            f"got {scale!r}"
        )
    return float(scale)


def _validate(q, k, v, gate, grid, tile_size, sparsity, topk):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, S, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)) + ((("gate", gate),) if gate is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != q.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}; "
                f"{name} must match q's [B, H, S, D]"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast it to match")
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; move it to q's device"
            )
    grid = _triple("grid", grid)
    tile_size = _triple("tile_size", tile_size)
    S = q.shape[2]
    if math.prod(grid) != S:
        raise ValueError(
            f"grid {grid} holds {math.prod(grid)} tokens but q has S={S}; pass the latent "
            "token grid (T, H/patch, W/patch) whose product is the sequence length"
        )
    n = math.prod(tile_counts_per_dim(grid, tile_size))
    if (sparsity is None) == (topk is None):
        raise ValueError("pass exactly one of sparsity= (fraction of key tiles skipped) or topk=")
    if sparsity is not None:
        # nan fails the range test too; inf and bools are refused as well
        if not _real(sparsity) or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(
                f"sparsity must be a number in [0, 1) (the fraction of key tiles skipped), "
                f"got {sparsity!r}"
            )
        k_sel = num_selected_tiles(n, float(sparsity))
    else:
        if not isinstance(topk, numbers.Integral) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
        topk = int(topk)
        if topk > n:
            raise ValueError(
                f"topk={topk} exceeds the {n} tiles of grid {grid} with tile_size {tile_size}; "
                f"use topk <= {n}"
            )
        k_sel = topk
    return grid, tile_size, k_sel


def video_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    tile_size: tuple[int, int, int] = (4, 4, 4),
    sparsity: float | None = None,
    topk: int | None = None,
    gate: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Video Sparse Attention (VSA) over a raster-ordered video token grid.

    Args:
        q, k, v: ``[B, H, S, D]`` with ``S = T * Hh * Ww`` tokens in raster (t, h, w) order.
        grid: the token grid ``(T, Hh, Ww)``.
        tile_size: tile shape ``(t, h, w)`` of positive integers; edge tiles may be
            partial.
        sparsity: fraction of key tiles each query tile skips, a finite number in
            ``[0, 1)``; keeps ``k = clamp(ceil((1 - sparsity) * N), 1, N)`` of the ``N``
            tiles.
        topk: the number of key tiles to keep (an integer in ``[1, N]``), instead of
            ``sparsity``.
        gate: optional ``[B, H, S, D]``; adds ``gate * coarse`` (the tile-level attention
            output broadcast to its query tile's tokens). ``None``: fine stage only.
        scale: softmax scale, a finite number > 0; default ``1 / sqrt(D)``.
        backend: ``auto`` (Triton on CUDA, else torch), ``torch``, ``triton``, ``flex``
            or ``reference`` (dense masked float32 oracle, small shapes).
        return_indices: also return the selected key tiles ``[B, H, N, k]`` (int64,
            ascending per query tile).

    Returns:
        ``[B, H, S, D]`` in raster order (and the indices when asked). With
        ``sparsity=0`` and no gate the result equals dense attention.

    Raises:
        ValueError: naming the argument, for a bad shape, dtype, device, grid, tile size,
            sparsity / topk (nan and inf included), scale (nan, inf, 0 or negative) or
            backend. The tensors' values are not checked (that would synchronise a GPU).

    Non-finite values (nan, inf) in ``q``, ``k``, ``v`` or ``gate`` are computed through,
    the same on every backend, with the semantics of dense attention restricted to the
    selection:

    * Coarse stage: a tile's mean sees its own tokens only, so a nan / inf token makes
      its tile's mean (and so that tile's coarse scores) non-finite, no other tile's.
    * Selection: a nan coarse score ranks as ``+inf`` (ties to the lower tile index). A
      key tile holding a nan is therefore selected by every query tile and the nan shows
      in their outputs, as dense attention would show it, rather than being silently
      dropped; a query tile whose scores are all nan selects tiles ``0 .. k-1``.
    * Fine stage: each query attends to the valid tokens of its selected tiles exactly as
      dense attention over those keys would (IEEE arithmetic: a nan value, or an infinite
      value under a probability of 0, gives nan; a ``+inf`` score gives a nan row). Keys
      of tiles a query tile did not select contribute nothing to its outputs, whatever
      their values, and get no gradient from them.
    * The gate's coarse branch attends to every tile: with ``gate`` given, a non-finite
      key or value reaches every query through ``gate * coarse``.
    """
    grid, tile_size, k_sel = _validate(q, k, v, gate, grid, tile_size, sparsity, topk)
    scale = _check_scale(scale)
    name = resolve_backend(backend, q.device, q.dtype)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    if name == "reference":
        out, idx = vsa_reference(
            q, k, v, grid=grid, tile_size=tile_size, topk=k_sel, gate=gate, scale=scale
        )
        return (out, idx) if return_indices else out

    plan = get_tile_plan(
        grid, tile_size, slots=slots_for(name, math.prod(tile_size)), device=q.device
    )
    q_t, k_t, v_t = plan.tile(q), plan.tile(k), plan.tile(v)  # [B, H, N * slots, D]
    # Coarse stage in float32: N x N is small and the selection should not flip with dtype.
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    def tile_mean(x_t: torch.Tensor) -> torch.Tensor:  # [B, H, N * slots, D] -> [B, H, N, D]
        if name == "triton":  # fused: no float32 copy of the tiled tensor
            return TileMeanFunction.apply(x_t, plan.counts, plan.slot_weight, plan.slots)
        return plan.tiled_mean(x_t.to(cdt))

    qc, kc = tile_mean(q_t), tile_mean(k_t)  # [B, H, N, D]
    scores_c = (qc @ kc.transpose(-1, -2)) * scale  # [B, H, N, N]
    idx = select_topk_tiles(scores_c, k_sel)  # [B, H, N, k]

    if k_sel == plan.num_tiles:
        # Every key tile is selected (sparsity 0, as at the start of a sparsity ramp): the
        # fine stage is exactly dense attention, and PyTorch's flash kernel is faster.
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # [B, H, S, D]
        if gate is not None:
            coarse = torch.softmax(scores_c, dim=-1) @ tile_mean(v_t)  # [B, H, N, D]
            out = out + gate * coarse.to(q.dtype).index_select(-2, plan.token_tile)
        return (out, idx) if return_indices else out

    out_t, _ = VSAFineFunction.apply(
        q_t, k_t, v_t, idx.to(torch.int32), plan.counts, plan.slots, scale, name
    )
    if gate is not None:
        vc = tile_mean(v_t)
        coarse = torch.softmax(scores_c, dim=-1) @ vc  # [B, H, N, D]
        out_t = out_t + plan.tile(gate) * plan.broadcast_tiles(coarse.to(q.dtype))
    out = plan.untile(out_t)  # [B, H, S, D]
    return (out, idx) if return_indices else out
