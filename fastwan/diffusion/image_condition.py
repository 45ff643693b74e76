"""Image conditioning of Wan image-to-video, as diffusers' ``WanImageToVideoPipeline`` does
it (pure tensor functions: the pipeline, the methods and the data tools share them).

Two kinds of model:

* **Wan2.1 I2V** (``task == "i2v"``): the VAE latent of the video ``[image, 0, ..., 0]``
  (or ``[image, 0, ..., 0, last_image]``) and a 4-channel mask of the frames given are
  concatenated to the noisy latents on the channel axis (16 + 4 + 16 = 36 input channels),
  and CLIP vision embeddings go to the transformer's image cross-attention.
* **Wan2.2 TI2V** (``task == "ti2v"``, ``expand_timesteps``): the image's VAE latent *is* the
  first latent frame, clean: it replaces the first frame of the model input at every step
  and of the result, and the first frame's tokens get timestep 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ImageCondition",
    "default_size_for_image",
    "first_frame_mask",
    "i2v_condition",
    "merge_first_frame",
    "per_token_timesteps",
    "per_token_timesteps_with_mask",
]


def default_size_for_image(
    image_hw: tuple[int, int], max_area: int, multiple: int
) -> tuple[int, int]:
    """``(height, width)`` of the image's aspect ratio with about ``max_area`` pixels, each
    a multiple of ``multiple`` (VAE stride x patch): the size diffusers' Wan image-to-video
    examples compute from the input image."""
    h, w = image_hw
    if h < 1 or w < 1 or max_area < 1 or multiple < 1:
        raise ValueError(f"image size {image_hw}, max_area and multiple must be positive")
    aspect = h / w
    height = max(multiple, round(math.sqrt(max_area * aspect)) // multiple * multiple)
    width = max(multiple, round(math.sqrt(max_area / aspect)) // multiple * multiple)
    return height, width


def i2v_condition(
    latent_condition: torch.Tensor, num_frames: int, vae_scale_t: int, last_image: bool = False
) -> torch.Tensor:
    """Wan2.1 I2V's extra input channels ``[B, 4 + C, T, h, w]``: the mask of the given
    frames (first, and last when ``last_image``) folded ``vae_scale_t`` pixel frames per
    latent frame, then ``latent_condition`` ``[B, C, T, h, w]`` (the normalised VAE latent
    of the conditioning video)."""
    b, _, t, h, w = latent_condition.shape
    if (num_frames - 1) // vae_scale_t + 1 != t:
        raise ValueError(
            f"latent_condition has {t} latent frames; {num_frames} frames make "
            f"{(num_frames - 1) // vae_scale_t + 1}"
        )
    mask = torch.zeros(b, 1, num_frames, h, w, device=latent_condition.device)
    mask[:, :, 0] = 1
    if last_image:
        mask[:, :, -1] = 1
    # the first frame stands for vae_scale_t frames (the causal VAE's first latent frame)
    mask = torch.cat([mask[:, :, :1].repeat_interleave(vae_scale_t, dim=2), mask[:, :, 1:]], 2)
    mask = mask.view(b, t, vae_scale_t, h, w).transpose(1, 2)  # [B, vae_scale_t, T, h, w]
    return torch.cat([mask.to(latent_condition.dtype), latent_condition], dim=1)


def first_frame_mask(
    num_latent_frames: int,
    height: int,
    width: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Wan2.2 TI2V's ``[1, 1, T, h, w]`` mask: 0 on the (clean, given) first latent frame,
    1 on the frames to generate."""
    mask = torch.ones(1, 1, num_latent_frames, height, width, device=device, dtype=dtype)
    mask[:, :, 0] = 0
    return mask


def merge_first_frame(
    latents: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``latents`` ``[B, C, T, h, w]`` with the first latent frame replaced by the clean
    ``condition`` (``[B, C, 1 or T, h, w]``) where ``mask`` (:func:`first_frame_mask`) is 0,
    computed as diffusers does: ``(1 - mask) * condition + mask * latents``."""
    if condition.shape[2] == 1 and latents.shape[2] > 1:
        pad = latents.shape[2] - 1
        condition = torch.cat(
            [condition, condition.new_zeros(*condition.shape[:2], pad, *condition.shape[3:])], 2
        )
    return (1 - mask) * condition + mask * latents


def per_token_timesteps_with_mask(
    t: torch.Tensor, mask: torch.Tensor, patch_size: tuple[int, int, int], batch: int
) -> torch.Tensor:
    """Per-token timesteps ``[B, S]`` of a TI2V step at timestep ``t`` (a scalar tensor):
    ``t`` on the tokens to generate, 0 on the given first frame (``mask`` at one value per
    patch)."""
    _, ph, pw = patch_size
    return (mask[0, 0][:, ::ph, ::pw] * t).flatten().unsqueeze(0).expand(batch, -1)


def per_token_timesteps(t: torch.Tensor, latent_shape: Sequence[int], patch_size) -> torch.Tensor:
    """Wan2.2 TI2V (diffusers' ``expand_timesteps``): the timesteps ``t`` ``[B]`` repeated
    for every latent token, ``[B, S]`` float32 with ``S = (T/p_t)(h/p_h)(w/p_w)`` tokens of
    latents ``[B, C, T, h, w]`` (text-to-video: every token shares its sample's timestep,
    as diffusers' WanPipeline passes them)."""
    if t.dim() != 1 or t.shape[0] != latent_shape[0]:
        raise ValueError(f"timesteps must be [B] with B = {latent_shape[0]}, got {tuple(t.shape)}")
    _, _, T, h, w = latent_shape
    p_t, p_h, p_w = patch_size
    tokens = (T // p_t) * (h // p_h) * (w // p_w)
    return t.to(torch.float32)[:, None].expand(-1, tokens)  # [B, S]


@dataclass
class ImageCondition:
    """The image side of one image-to-video batch, applied to every model call.

    * ``task == "ti2v"`` (Wan2.2 TI2V): ``latent`` ``[B, C, 1, h, w]`` is the clean first
      latent frame and ``mask`` (:func:`first_frame_mask`) marks the frames to generate;
      the model sees the merged latents and timestep 0 on the first frame's tokens.
    * ``task == "i2v"`` (Wan2.1 I2V): ``latent`` ``[B, 4 + C, T, h, w]`` (:func:`i2v_condition`)
      is concatenated to the model input; ``image_embeds`` ``[B, N, D]`` (CLIP) go to the
      image cross-attention (``None`` for a transformer without one).
    """

    task: str
    latent: torch.Tensor
    mask: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.task not in ("ti2v", "i2v"):
            raise ValueError(f"task must be 'ti2v' or 'i2v', got {self.task!r}")
        if self.task == "ti2v" and self.mask is None:
            raise ValueError("a ti2v condition needs its first-frame mask")

    def model_inputs(
        self, x: torch.Tensor, t: torch.Tensor, patch_size: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_states, timestep) of the transformer call at latents ``x``
        ``[B, C, T, h, w]`` and timesteps ``t`` ``[B]`` (one value)."""
        if self.task == "ti2v":
            hidden = merge_first_frame(x, self.latent.to(x.dtype), self.mask.to(x.dtype))
            return hidden, per_token_timesteps_with_mask(t[0], self.mask, patch_size, x.shape[0])
        return torch.cat([x, self.latent.to(x.dtype)], dim=1), t

    def finalize(self, x0: torch.Tensor) -> torch.Tensor:
        """The result latents: TI2V's first frame is the given one."""
        if self.task == "ti2v":
            return merge_first_frame(x0, self.latent.to(x0.dtype), self.mask.to(x0.dtype))
        return x0
