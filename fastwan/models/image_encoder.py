"""The image side of Wan image-to-video, computed as diffusers' ``WanImageToVideoPipeline``
computes it: CLIP vision embeddings (Wan2.1 I2V) and the VAE latent of the conditioning
video (Wan2.1 I2V: ``[image, 0, ..., 0(, last_image)]``; Wan2.2 TI2V: the image alone).
Shared by :class:`fastwan.pipeline.VideoGenerator` and the data tools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "load_image",
    "load_image_encoder",
    "clip_image_embeds",
    "image_to_tensor",
    "vae_condition_latents",
]


def load_image(image: Any, field: str = "image") -> Any:
    """A PIL RGB image from a PIL image, a file path, a ``[H, W, 3]`` uint8 / float [0, 1]
    array or a ``[3, H, W]`` / ``[H, W, 3]`` tensor in [0, 1]; a ValueError naming
    ``field`` otherwise."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{field}: {str(path)!r} is not a file; pass an image file")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"{field}: {str(path)!r} is not a readable image ({err})") from None
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
            t = t.permute(1, 2, 0)  # [3, H, W] -> [H, W, 3]
        image = t.float().numpy() if t.dtype != torch.uint8 else t.numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{field} must be [H, W, 3] (RGB), got shape {image.shape}")
        if image.dtype != np.uint8:
            if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                raise ValueError(f"{field}: a float image must hold values in [0, 1]")
            image = np.round(image * 255).astype(np.uint8)
        return Image.fromarray(image, "RGB")
    raise ValueError(
        f"{field} must be a PIL image, a file path, a numpy array or a tensor, got "
        f"{type(image).__name__}"
    )


def image_to_tensor(image: Any, height: int, width: int) -> torch.Tensor:
    """``[1, 3, height, width]`` float32 in [-1, 1]: the image resized as diffusers'
    ``VideoProcessor.preprocess(image, height, width)`` does (bicubic PIL resize)."""
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor().preprocess(load_image(image), height=height, width=width).float()


def load_image_encoder(path: str | Path, device: Any = "cpu", dtype: torch.dtype = torch.float32):
    """``(CLIPVisionModel, CLIPImageProcessor)`` from a Wan2.1 I2V pipeline folder's
    ``image_encoder/`` and ``image_processor/`` (a ValueError naming the folder if absent)."""
    import transformers

    path = Path(path)
    for sub in ("image_encoder", "image_processor"):
        if not (path / sub).is_dir():
            raise ValueError(
                f"{str(path)!r} has no {sub}/ folder: an image-to-video Wan2.1 folder needs "
                "the CLIP image encoder and its processor (as Wan-AI/Wan2.1-I2V-14B-480P-"
                "Diffusers ships them)"
            )
    encoder = transformers.CLIPVisionModel.from_pretrained(path / "image_encoder", dtype=dtype)
    processor = transformers.CLIPImageProcessor.from_pretrained(path / "image_processor")
    return encoder.to(device).eval(), processor


@torch.no_grad()
def clip_image_embeds(encoder: Any, processor: Any, images: list[Any]) -> torch.Tensor:
    """``[len(images), N, D]``: CLIP's penultimate hidden states of the raw images, the
    embeddings Wan2.1 I2V's image cross-attention takes (diffusers' ``encode_image``)."""
    device = next(encoder.parameters()).device
    inputs = processor(images=[load_image(i) for i in images], return_tensors="pt")
    pixels = inputs["pixel_values"].to(device, next(encoder.parameters()).dtype)
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


@torch.no_grad()
def vae_condition_latents(
    vae: Any,
    image: torch.Tensor,
    num_frames: int,
    *,
    expand_timesteps: bool,
    last_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """The normalised VAE latent ``[B, C, T, h, w]`` of the conditioning video of ``image``
    ``[B, 3, H, W]`` in [-1, 1]: the image alone for Wan2.2 TI2V (``expand_timesteps``: one
    latent frame), else ``[image, 0, ..., 0]`` over ``num_frames`` (``last_image`` last)."""
    frames = image.unsqueeze(2)  # [B, 3, 1, H, W]
    if not expand_timesteps:
        b, c, _, h, w = frames.shape
        gap = num_frames - 1 - (last_image is not None)
        parts = [frames, frames.new_zeros(b, c, gap, h, w)]
        if last_image is not None:
            parts.append(last_image.unsqueeze(2))
        frames = torch.cat(parts, dim=2)  # [B, 3, F, H, W]
    # a VAE without weights (the toy world's pixel fold) has buffers only
    param = next(vae.parameters(), None)
    if param is None:
        param = next(vae.buffers())
    latent = vae.encode(frames.to(param.device, param.dtype)).latent_dist.mode()
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
    latent = latent.float()
    return (latent - mean.to(latent.device)) * inv_std.to(latent.device)
