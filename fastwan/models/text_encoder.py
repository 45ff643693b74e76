"""Wan's text side, as diffusers' Wan pipelines compute it: prompt cleaning and UMT5
embeddings whose padding positions are zero. Shared by
:class:`fastwan.pipeline.VideoGenerator` and the data tools (:mod:`fastwan.data.encoders`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TextEmbeddings", "clean_prompt", "encode_prompts"]


def clean_prompt(text: str) -> str:
    """The Wan pipeline's prompt cleaning: ftfy when installed, HTML unescaping,
    whitespace collapsing (identical text reaches the tokenizer as in diffusers)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class TextEmbeddings:
    """UMT5 embeddings of a batch of prompts."""

    hidden: torch.Tensor  # [B, L, dim]; positions past each prompt's tokens are zero
    lengths: list[int]  # valid tokens per prompt
    truncated: list[tuple[int, int]]  # (prompt index, tokens dropped) of over-long prompts

    def trimmed(self) -> list[torch.Tensor]:
        """One ``[n_i, dim]`` tensor per prompt: its valid tokens only."""
        return [h[:n] for h, n in zip(self.hidden, self.lengths)]


@torch.no_grad()
def encode_prompts(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    prompts: Sequence[str],
    max_length: int,
    device: torch.device | str | None = None,
) -> TextEmbeddings:
    """Clean, tokenise to ``max_length`` (padded, truncated) and encode ``prompts`` with the
    UMT5 ``text_encoder`` on ``device`` (default: the encoder's), zeroing the padding
    positions as the Wan pipeline does."""
    if device is None:
        device = next(text_encoder.parameters()).device
    cleaned = [clean_prompt(p) for p in prompts]
    inputs = tokenizer(
        cleaned,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs.input_ids, inputs.attention_mask  # [B, L]
    lengths = mask.gt(0).sum(dim=1)  # [B]
    full = tokenizer(cleaned, add_special_tokens=True).input_ids
    truncated = [(i, len(f) - max_length) for i, f in enumerate(full) if len(f) > max_length]
    hidden = text_encoder(ids.to(device), mask.to(device)).last_hidden_state  # [B, L, dim]
    keep = (
        torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        < lengths.to(hidden.device)[:, None]
    )  # [B, L]
    hidden = hidden * keep[..., None].to(hidden.dtype)
    return TextEmbeddings(hidden=hidden, lengths=lengths.tolist(), truncated=truncated)
