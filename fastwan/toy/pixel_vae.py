"""The toy world's "VAE": pixels folded into channels, exactly invertible, no weights.

``encode`` folds each ``s x s`` pixel block of a ``[B, 3, T, H, W]`` video in [-1, 1] into
channels (``[B, 3 s^2, T, H/s, W/s]``, a pixel unshuffle); ``decode`` unfolds it.

With ``coord_channels=3`` the latent also carries three fixed coordinate channels (linear
ramps over frame, row and column, in [-1, 1]) that ``decode`` drops. Wan's transformer
has no absolute position embedding (RoPE is relative, the patch embedding has no
padding), so from noise alone a token cannot tell where (or when) it is; real Wan learns
that from edge effects at scale, a toy model in minutes does not: it then renders
fragments that neither sit nor move where the prompt says. The ramps, denoised like any
channel, tell each token its place as soon as the noise starts to clear. It speaks
the part of diffusers' ``AutoencoderKLWan`` interface that fastwan uses (config fields
``z_dim``, ``scale_factor_spatial``, ``scale_factor_temporal``, ``latents_mean``,
``latents_std``; ``encode(x).latent_dist``; ``decode(z, return_dict=False)``), so the toy
models run through the same loading, data and sampling code as Wan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from fastwan.models.loading import register_vae_class

__all__ = ["ToyPixelVAE"]


@dataclass
class _Posterior:
    """A deterministic posterior: mean = mode = sample."""

    mean: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # diffusers' DiagonalGaussianDistribution.sample(generator=...): its public name
        del generator  # deterministic
        return self.mean


@dataclass
class _EncoderOutput:
    latent_dist: _Posterior


@dataclass
class _DecoderOutput:
    sample: torch.Tensor


@register_vae_class  # fastwan.models.loading.load_vae loads its folders
class ToyPixelVAE(ModelMixin, ConfigMixin):
    """Pixel (un)shuffle by ``scale_factor_spatial`` in height and width; time unchanged."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        scale_factor_spatial: int = 4,
        scale_factor_temporal: int = 1,
        in_channels: int = 3,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        z_dim: int | None = None,
        coord_channels: int = 0,
    ) -> None:
        super().__init__()
        if scale_factor_temporal != 1:
            raise ValueError("ToyPixelVAE keeps every frame: scale_factor_temporal must be 1")
        if scale_factor_spatial < 1:
            raise ValueError(f"scale_factor_spatial must be >= 1, got {scale_factor_spatial}")
        if coord_channels not in (0, 3):
            raise ValueError(
                f"coord_channels must be 0 (none) or 3 (frame, row, column), got {coord_channels}"
            )
        want = in_channels * scale_factor_spatial**2 + coord_channels
        if z_dim is not None and z_dim != want:
            raise ValueError(
                f"z_dim must be in_channels x scale_factor_spatial^2 + coord_channels = "
                f"{want}, got {z_dim}"
            )
        z_dim = want
        self.register_to_config(z_dim=z_dim)
        for name, value in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if value is not None and len(value) != z_dim:
                raise ValueError(f"{name} must have z_dim={z_dim} entries, got {len(value)}")
        if latents_mean is None:
            self.register_to_config(latents_mean=[0.0] * z_dim)
        if latents_std is None:
            self.register_to_config(latents_std=[1.0] * z_dim)
        # A buffer gives the module a dtype and device like a real VAE's.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load from a folder's ``config.json`` (there are no weights to read; the fold is
        exact in any dtype, so ``torch_dtype`` changes nothing)."""
        return cls.from_config(cls.load_config(path))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """``[B, 3, T, H, W]`` in [-1, 1] -> posterior over ``[B, 3 s^2, T, H/s, W/s]``."""
        s = self.config.scale_factor_spatial
        b, c, t, h, w = x.shape
        if h % s or w % s:
            raise ValueError(f"height {h} and width {w} must be multiples of {s}")
        z = x.reshape(b, c, t, h // s, s, w // s, s)
        z = z.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * s * s, t, h // s, w // s)
        if self.config.coord_channels:
            z = torch.cat([z, self.coordinates(b, t, h // s, w // s).to(z)], dim=1)
        out = _EncoderOutput(_Posterior(z))
        return out if return_dict else (out.latent_dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """``[B, 3 s^2, T, h, w]`` -> ``[B, 3, T, h s, w s]``."""
        s = self.config.scale_factor_spatial
        z = z[:, : z.shape[1] - self.config.coord_channels]  # the pixel channels
        b, cz, t, h, w = z.shape
        c = cz // (s * s)
        x = z.reshape(b, c, s, s, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
        x = x.reshape(b, c, t, h * s, w * s)
        return _DecoderOutput(x) if return_dict else (x,)

    @staticmethod
    def coordinates(b: int, t: int, h: int, w: int) -> torch.Tensor:
        """The coordinate channels ``[b, 3, t, h, w]``: frame, row, column ramps in [-1, 1].
        A lone frame is a clip's first (frame coordinate -1), as a causal video VAE encodes
        an image as the first latent frame: image-to-video's condition latent of a clip's
        first frame is then that clip's first latent frame."""
        axes = [torch.linspace(-1, 1, n) if n > 1 else torch.zeros(1) for n in (t, h, w)]
        if t == 1:
            axes[0] = torch.full((1,), -1.0)
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # [3, t, h, w]
        return grid.expand(b, -1, -1, -1, -1)

    def enable_tiling(self) -> None:
        """Nothing to tile: kept for interface parity with ``AutoencoderKLWan``."""
