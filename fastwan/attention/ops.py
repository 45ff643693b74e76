"""Operator layers of the VSA fine stage (flash-attention style).

1. ``torch.library.custom_op`` ops ``fastwan::vsa_fine_fwd`` / ``fastwan::vsa_fine_bwd`` with
   fake implementations, so ``torch.compile`` traces through them without graph breaks.
2. ``VSAFineFunction``: the autograd function pairing them.
   (``fastwan::vsa_tile_mean`` / ``TileMeanFunction``: the coarse stage's fused tile mean
   on the Triton backend, the same layers.)
3. The public ``video_sparse_attention`` (``fastwan.attention.api``) builds on 2.

The ``backend`` string picks the implementation module at call time: ``torch``
(block gather), ``triton`` (GPU kernels; CPU under the Triton interpreter) or ``flex``.
"""

from __future__ import annotations

import importlib

import torch

_BACKEND_MODULES = {
    "torch": "fastwan.attention.torch_backend",
    "triton": "fastwan.attention.triton_backend",
    "flex": "fastwan.attention.flex_backend",
}


def fine_backend(name: str):
    """The module implementing ``fine_forward`` / ``fine_backward`` for backend ``name``."""
    return importlib.import_module(_BACKEND_MODULES[name])


@torch.library.custom_op("fastwan::vsa_fine_fwd", mutates_args=())
def vsa_fine_fwd(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    slots: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-stage forward. Shapes: q_t/k_t/v_t [B, H, N*slots, D], idx [B, H, N, k],
    counts [N]. Returns out [B, H, N*slots, D] and lse [B, H, N*slots] (float32; float64
    for float64 inputs), or [B, H, 0] for the torch backend, whose backward renormalises
    rows exactly and needs no lse (which saves a pass over the scores)."""
    args = (q_t.contiguous(), k_t.contiguous(), v_t.contiguous(), idx, counts, slots, scale)
    if backend == "torch":
        return fine_backend(backend).fine_forward(*args, with_lse=False)
    return fine_backend(backend).fine_forward(*args)


@vsa_fine_fwd.register_fake
def _(q_t, k_t, v_t, idx, counts, slots, scale, backend):
    lse_dtype = torch.float64 if q_t.dtype == torch.float64 else torch.float32
    B, H, Sp, _ = q_t.shape
    return torch.empty_like(q_t), q_t.new_empty(
        B, H, 0 if backend == "torch" else Sp, dtype=lse_dtype
    )


@torch.library.custom_op("fastwan::vsa_fine_bwd", mutates_args=())
def vsa_fine_bwd(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fine-stage backward: (dq, dk, dv), each shaped like its input."""
    q_t, k_t, v_t, out = (t.contiguous() for t in (q_t, k_t, v_t, out))
    return fine_backend(backend).fine_backward(
        do.contiguous(), q_t, k_t, v_t, out, lse, idx, counts, slots, scale
    )


@vsa_fine_bwd.register_fake
def _(do, q_t, k_t, v_t, out, lse, idx, counts, slots, scale, backend):
    return torch.empty_like(q_t), torch.empty_like(k_t), torch.empty_like(v_t)


class VSAFineFunction(torch.autograd.Function):
    """Autograd for the fine stage; the selection ``idx`` is not differentiated."""

    @staticmethod
    def forward(ctx, q_t, k_t, v_t, idx, counts, slots, scale, backend):
        out, lse = vsa_fine_fwd(q_t, k_t, v_t, idx, counts, slots, scale, backend)
        ctx.save_for_backward(q_t, k_t, v_t, out, lse, idx, counts)
        ctx.slots, ctx.scale, ctx.backend = slots, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q_t, k_t, v_t, out, lse, idx, counts = ctx.saved_tensors
        dq, dk, dv = vsa_fine_bwd(
            do, q_t, k_t, v_t, out, lse, idx, counts, ctx.slots, ctx.scale, ctx.backend
        )
        return dq, dk, dv, None, None, None, None, None


@torch.library.custom_op("fastwan::vsa_tile_mean", mutates_args=())
def vsa_tile_mean(x_t: torch.Tensor, counts: torch.Tensor, slots: int) -> torch.Tensor:
    """Float32 mean over each tile's valid slots (Triton): [B, H, N*slots, D] -> [B, H, N, D]."""
    return fine_backend("triton").tile_mean(x_t, counts, slots)


@vsa_tile_mean.register_fake
def _(x_t, counts, slots):
    B, H, Sp, D = x_t.shape
    return x_t.new_empty(B, H, Sp // slots, D, dtype=torch.float32)


class TileMeanFunction(torch.autograd.Function):
    """Autograd for ``vsa_tile_mean``: dx = slot_weight * dmean broadcast over each tile's
    slots (slot_weight: [N*slots], 1 / count on valid slots, 0 on pads)."""

    @staticmethod
    def forward(ctx, x_t, counts, slot_weight, slots):
        ctx.save_for_backward(slot_weight)
        ctx.slots, ctx.dtype = slots, x_t.dtype
        return vsa_tile_mean(x_t, counts, slots)

    @staticmethod
    def backward(ctx, dmean):  # [B, H, N, D]
        (w,) = ctx.saved_tensors
        N = dmean.shape[-2]
        dx = dmean.unsqueeze(-2) * w.view(N, ctx.slots, 1).to(dmean.dtype)  # [B, H, N, slots, D]
        return dx.flatten(-3, -2).to(ctx.dtype), None, None, None
