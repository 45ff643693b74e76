"""VSA on diffusers' Wan transformer: a per-layer gate and a self-attention processor.

Nothing of the Wan model is copied. fastwan adds to each ``WanTransformerBlock``

* ``to_gate_compress``: ``Linear(dim, dim)``, registered on the block so that its state-dict
  keys are ``blocks.N.to_gate_compress.{weight,bias}`` (the layout FastWan checkpoints use),
  zero-initialised so an untrained gate leaves the model exactly as it was;
* a processor for the block's self-attention (``attn1``) that runs VSA or dense attention.
  Cross-attention (``attn2``) keeps diffusers' processor.

The processor needs the token grid (T, H/2, W/2): a forward pre-hook on the transformer
reads it from the latent shape before the blocks run. All state lives on the transformer
instance, so a dense teacher and a VSA student coexist in one process, and ``deepcopy``
(an EMA copy) gets its own.

Sequence parallelism (:mod:`fastwan.distributed.sequence_parallel`) puts its context in the
same state: the processor then sees local tokens, and trades sequence shards for head
shards around the attention itself (dense or VSA over the full token grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastwan.attention import video_sparse_attention
from fastwan.choices import ATTENTION_BACKENDS, check_choice

GATE_NAME = "to_gate_compress"
ATTENTION_MODES = ("vsa", "dense")
_STATE_ATTR = "_fastwan_vsa_state"


@dataclass
class _GridState:
    """Per-transformer state the pre-hook writes and the processors read."""

    grid: tuple[int, int, int] | None = None
    hooked: bool = False  # the pre-hook is registered (once per instance)
    # Ulysses context (fastwan.distributed.sequence_parallel.SequenceParallel) or None.
    sp: Any = None


def transformer_blocks(transformer: nn.Module) -> nn.ModuleList:
    """The ``blocks`` of a diffusers ``WanTransformer3DModel`` (a ValueError otherwise)."""
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not all(hasattr(b, "attn1") for b in blocks):
        raise ValueError(
            f"expected a diffusers WanTransformer3DModel (blocks with attn1), got "
            f"{type(transformer).__name__}"
        )
    return blocks


def add_vsa_gates(transformer: nn.Module) -> list[nn.Linear]:
    """Give every block a zero-initialised ``to_gate_compress`` if it has none; return the
    gates in block order."""
    gates = []
    for block in transformer_blocks(transformer):
        gate = getattr(block, GATE_NAME, None)
        if gate is None:
            ref = block.attn1.to_q.weight  # the gate lives beside q, k, v: same device, dtype
            dim = block.attn1.to_q.in_features
            gate = nn.Linear(dim, dim, bias=True, device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                gate.weight.zero_()
                gate.bias.zero_()
            block.add_module(GATE_NAME, gate)
        gates.append(gate)
    return gates


def has_vsa_gates(transformer: nn.Module) -> bool:
    return all(getattr(b, GATE_NAME, None) is not None for b in transformer_blocks(transformer))


def _state(transformer: nn.Module) -> _GridState:
    state = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        state = _GridState()
        setattr(transformer, _STATE_ATTR, state)
    if not state.hooked:
        # A module-level function (not a closure): deepcopy keeps it, and it finds the
        # copy's own state through the module it is called with.
        transformer.register_forward_pre_hook(_record_grid, with_kwargs=True)
        state.hooked = True
    return state


def set_sequence_parallel(transformer: nn.Module, sp: Any) -> None:
    """Hand the self-attention processors a Ulysses context
    (:class:`fastwan.distributed.sequence_parallel.SequenceParallel`), or ``None`` to end
    sequence parallelism."""
    _state(transformer).sp = sp


def _record_grid(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the VSA token grid from the latent ``[B, C, T, H, W]``."""
    latents = kwargs.get("hidden_states", args[0] if args else None)
    if latents is None or latents.dim() != 5:
        return
    p_t, p_h, p_w = module.config.patch_size
    T, H, W = latents.shape[2:]
    # Read through the module so that a deepcopy's hook writes its own state.
    getattr(module, _STATE_ATTR).grid = (T // p_t, H // p_h, W // p_w)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on ``[B, S, H, D]``: channel pairs (2i, 2i+1) rotated by the
    angle whose cos/sin diffusers stores repeat-interleaved as ``[1, S, 1, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, D/2] each
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.type_as(x)


class WanVSAAttnProcessor:
    """Self-attention processor for a Wan block: VSA (``mode="vsa"``) or dense.

    VSA: q, k, v exactly as diffusers computes them (projection, RMS norm across heads,
    rotary), the gate from the same input (the block's normed, modulated hidden state)
    reshaped to heads like q; output = fine + gate * coarse. Dense: diffusers' own
    ``WanAttnProcessor``, so dense mode is bit-identical to stock diffusers.

    Under sequence parallelism (``state.sp`` set) the input holds this rank's tokens;
    q, k, v (and the gate) are computed on them, exchanged for the full sequence of a
    subset of heads, attended (dense SDPA or VSA), and exchanged back.
    """

    def __init__(
        self,
        gate: nn.Linear,
        state: _GridState,
        *,
        mode: str = "vsa",
        sparsity: float = 0.0,
        tile_size: tuple[int, int, int] = (4, 4, 4),
        backend: str = "auto",
    ) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.gate = gate
        self.state = state
        self.mode = mode
        self.sparsity = float(sparsity)
        self.tile_size = tuple(tile_size)
        self.backend = backend
        self._dense = WanAttnProcessor()

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,  # [B, S, dim]
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        sp = self.state.sp
        if encoder_hidden_states is not None or (self.mode == "dense" and sp is None):
            return self._dense(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        if attention_mask is not None:
            raise ValueError(
                "fastwan's self-attention (VSA, or sequence-parallel) takes no attention_mask"
            )
        grid = self.state.grid
        if grid is None and self.mode == "vsa":
            raise ValueError(
                "the VSA processor does not know the token grid: call the transformer itself "
                "(its forward pre-hook records the grid from the latent shape)"
            )
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        heads = attn.heads
        q, k, v = (x.unflatten(2, (heads, -1)) for x in (q, k, v))  # [B, S, H, D]
        if rotary_emb is not None:
            q = _apply_rotary(q, *rotary_emb)
            k = _apply_rotary(k, *rotary_emb)
        gate = None
        if self.mode == "vsa":
            gate = self.gate(hidden_states).unflatten(2, (heads, -1)).type_as(q)  # [B, S, H, D]
        if sp is not None:
            # Ulysses: [B, S_loc, H, D] local tokens -> [B, S, H / sp, D] full sequence.
            if gate is None:
                q, k, v = sp.seq_to_heads(q, k, v)
            else:
                q, k, v, gate = sp.seq_to_heads(q, k, v, gate)

        if self.mode == "vsa":
            out = video_sparse_attention(
                q.transpose(1, 2),  # [B, H, S, D]
                k.transpose(1, 2),
                v.transpose(1, 2),
                grid=grid,
                tile_size=self.tile_size,
                sparsity=self.sparsity,
                gate=gate.transpose(1, 2),
                backend=self.backend,
            )
        else:  # dense under sequence parallelism: the same SDPA diffusers dispatches to
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )  # [B, H, S, D]
        out = out.transpose(1, 2)  # [B, S, H, D]
        if sp is not None:
            out = sp.heads_to_seq(out)  # [B, S_loc, H, D]
        out = out.flatten(2, 3).type_as(q)  # [B, S, dim] (S_loc tokens under SP)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _check_tile(tile_size) -> tuple[int, int, int]:
    try:
        tile = tuple(int(x) for x in tile_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"tile_size must be three positive ints (t, h, w), got {tile_size!r}"
        ) from None
    if len(tile) != 3 or any(x <= 0 for x in tile):
        raise ValueError(f"tile_size must be three positive ints (t, h, w), got {tile_size!r}")
    return tile  # type: ignore[return-value]


def set_attention(
    transformer: nn.Module,
    mode: str,
    *,
    sparsity: float | None = None,
    tile_size: Sequence[int] = (4, 4, 4),
    backend: str = "auto",
) -> None:
    """Switch a Wan transformer's self-attention to ``"vsa"`` (needs ``sparsity``) or
    ``"dense"``. Only this instance changes; gates are added (zero) where missing."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    if mode == "vsa":
        if sparsity is None:
            raise ValueError("attention='vsa' needs sparsity= (fraction of key tiles skipped)")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    check_choice(backend, ATTENTION_BACKENDS, "backend")
    tile = _check_tile(tile_size)
    gates = add_vsa_gates(transformer)
    state = _state(transformer)
    for block, gate in zip(transformer_blocks(transformer), gates):
        block.attn1.set_processor(
            WanVSAAttnProcessor(
                gate,
                state,
                mode=mode,
                sparsity=float(sparsity or 0.0),
                tile_size=tile,
                backend=backend,
            )
        )


def get_attention(transformer: nn.Module) -> dict:
    """The current self-attention setting: ``{"mode", "sparsity", "tile_size", "backend"}``
    (``mode="dense"`` for a transformer fastwan has not configured)."""
    proc = transformer_blocks(transformer)[0].attn1.processor
    if not isinstance(proc, WanVSAAttnProcessor):
        return {"mode": "dense", "sparsity": 0.0, "tile_size": None, "backend": None}
    return {
        "mode": proc.mode,
        "sparsity": proc.sparsity,
        "tile_size": proc.tile_size,
        "backend": proc.backend,
    }
