"""``flow``: flow-matching fine-tuning of one Wan transformer, dense or with VSA.

The network is trained in place with the rectified-flow loss
(:func:`fastwan.methods.losses.flow_matching_loss`): ``x_t = (1 - s) x0 + s eps`` with
``s`` uniform after the timestep shift, target ``v = eps - x0``. With VSA enabled its
sparsity follows the schedule of :func:`fastwan.methods.schedules.vsa_sparsity_from_config`
(a dense model learns to attend sparsely as the sparsity ramps up).

Also home of the helpers every method shares: reading the text condition from a batch,
calling a Wan transformer on latents, drawing noise from an explicit ``rng``
(``torch.Generator``), and the image condition of image-to-video batches
(:func:`image_condition_of`):

* **Wan2.2 TI2V** (``expand_timesteps``): the batch's ``first_frame_latent`` is the clean
  first latent frame. Every network call sees it merged into its input with timestep 0 on
  its tokens (:func:`call_transformer`), every x0 a method forms keeps it
  (:func:`keep_given_frames`), and losses are taken on the other frames only
  (:func:`generated_frames`): training never changes nor learns the given frame.
* **Wan2.1 I2V**: the mask of the given frame and the VAE latent of ``[image, 0, ..., 0]``
  are concatenated to the input channels, the CLIP features (``clip_feature``) go to the
  image cross-attention; all frames are generated (and trained), as diffusers samples them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastwan.config import LoRAConfig, VSAConfig
from fastwan.diffusion.flow import add_noise
from fastwan.diffusion.image_condition import (
    ImageCondition,
    first_frame_mask,
    i2v_condition,
    merge_first_frame,
    per_token_timesteps,
)
from fastwan.methods.adapters import attach_adapter, freeze_except_adapters, role_parameters
from fastwan.methods.losses import flow_matching_loss, sample_dmd_timesteps
from fastwan.methods.schedules import vsa_sparsity_from_config
from fastwan.models.lora import init_lora_weights
from fastwan.models.vsa import set_attention

__all__ = [
    "FlowMethod",
    "call_transformer",
    "draw_noise",
    "generated_frames",
    "image_condition_of",
    "keep_given_frames",
    "latents_of",
    "text_condition",
]


def _check_rng(rng: Any) -> None:
    if not isinstance(rng, torch.Generator):
        raise ValueError(
            f"rng must be a torch.Generator, got {type(rng).__name__}; "
            "pass torch.Generator().manual_seed(seed)"
        )


def draw_noise(
    shape: torch.Size | tuple[int, ...], rng: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` from ``rng`` (drawn on its device)."""
    eps = torch.randn(shape, generator=rng, device=rng.device, dtype=torch.float32)
    return eps.to(device)


def text_condition(
    batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The batch's prompt embeddings ``[B, L, dim]`` with padding zeroed by ``text_mask``.

    ``batch["text_embedding"]`` ``[B, L, dim]`` and (optional) ``batch["text_mask"]``
    ``[B, L]`` (true = token), as :func:`fastwan.data.dataset.collate_samples` makes them.
    Padding positions are zeroed, as the Wan pipeline does before the transformer.
    """
    if "text_embedding" not in batch:
        raise ValueError(
            "batch lacks 'text_embedding' [B, L, dim]; build batches with "
            "fastwan.data.dataset.collate_samples (or add the prompt embeddings)"
        )
    emb = batch["text_embedding"]
    if not isinstance(emb, torch.Tensor) or emb.dim() != 3:
        raise ValueError(
            f"batch['text_embedding'] must be a [B, L, dim] tensor, got "
            f"{tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}"
        )
    emb = emb.to(device=device, dtype=dtype)  # [B, L, dim]
    mask = batch.get("text_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(emb.shape[:2]):
            raise ValueError(
                f"batch['text_mask'] must be a [B, L] = {tuple(emb.shape[:2])} tensor, got "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        emb = emb * mask.to(device=device).bool()[..., None].to(dtype)  # [B, L, dim]
    return emb


def latents_of(batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """``batch["latents"]`` ``[B, C, T, H, W]`` as float32 on ``device``."""
    lat = batch.get("latents")
    if lat is None:
        raise ValueError(
            "batch lacks 'latents' [B, C, T, H, W]: this method needs video latents; use a "
            "dataset with latents (data.text_only: false) or dmd.rollout: simulate"
        )
    if not isinstance(lat, torch.Tensor) or lat.dim() != 5:
        raise ValueError(
            f"batch['latents'] must be a [B, C, T, H, W] tensor, got "
            f"{tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__}"
        )
    return lat.to(device=device, dtype=torch.float32)


def takes_image_channels(net: nn.Module) -> bool:
    """Whether ``net`` is a Wan2.1 I2V transformer: condition channels concatenated to its
    input (``in_channels`` 16 + 4 + 16 = 36 against ``out_channels`` 16)."""
    config = net.config
    return int(config.in_channels) != int(config.get("out_channels") or config.in_channels)


def image_condition_of(
    batch: Mapping[str, Any],
    net: nn.Module,
    latent_shape: tuple[int, ...],
    *,
    expand_timesteps: bool,
    vae_scale_temporal: int,
    device: torch.device,
) -> ImageCondition | None:
    """The :class:`ImageCondition` of an image-to-video ``batch`` for transformer ``net``
    generating latents of ``latent_shape`` ``[B, C, T, h, w]``; None for a text-to-video
    batch (no ``first_frame_latent``) of a model that does not need one.

    ``batch["first_frame_latent"]`` ``[B, C, T', h, w]`` (normalised, as
    :class:`fastwan.data.dataset.LatentDataset` reads it with ``image_condition``): for
    Wan2.2 TI2V (``expand_timesteps``) the image's latent (its first frame is used); for
    Wan2.1 I2V the latent of ``[image, 0, ..., 0]`` over the clip (``T' == T``), to which
    the frame mask is added (``vae_scale_temporal`` pixel frames per latent frame).
    ``batch["clip_feature"]`` ``[B, N, D]``: the CLIP features, needed by a transformer
    with image cross-attention (``image_dim``)."""
    b, _c, t, h, w = latent_shape
    first = batch.get("first_frame_latent")
    channels = takes_image_channels(net)
    if first is None:
        if channels:
            raise ValueError(
                "batch lacks 'first_frame_latent': the transformer is a Wan2.1 image-to-video "
                "model (condition channels); train it on i2v shards (`fastwan preprocess "
                "--task i2v`, or `preprocess-text --task i2v` for data-free) and read them "
                "with image_condition"
            )
        return None
    if not isinstance(first, torch.Tensor) or first.dim() != 5 or first.shape[0] != b:
        got = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise ValueError(
            f"batch['first_frame_latent'] must be a [B, C, T, h, w] tensor with B = {b}, got {got}"
        )
    first = first.to(device=device, dtype=torch.float32)
    if tuple(first.shape[3:]) != (h, w):
        raise ValueError(
            f"batch['first_frame_latent'] is {tuple(first.shape)} but the latents are "
            f"{tuple(latent_shape)}: encode the image at the clip's size (fastwan preprocess "
            "--task i2v at the recipe's --height / --width)"
        )
    if expand_timesteps:  # Wan2.2 TI2V: the clean first latent frame
        if first.shape[1] != latent_shape[1]:
            raise ValueError(
                f"batch['first_frame_latent'] has {first.shape[1]} channels, the latents "
                f"{latent_shape[1]}"
            )
        mask = first_frame_mask(t, h, w, device=device)  # [1, 1, T, h, w]
        return ImageCondition("ti2v", first[:, :, :1].contiguous(), mask=mask)
    if not channels:
        raise ValueError(
            "batch has 'first_frame_latent' but the transformer takes no image condition "
            "(neither Wan2.1 I2V condition channels nor Wan2.2 TI2V per-token timesteps): "
            "train a text-to-video model on video / text shards"
        )
    if first.shape[2] != t:
        raise ValueError(
            f"batch['first_frame_latent'] has {first.shape[2]} latent frames, the latents {t}: "
            "Wan2.1 I2V's condition is the latent of [image, 0, ..., 0] over the whole clip"
        )
    cond = i2v_condition(first, (t - 1) * vae_scale_temporal + 1, vae_scale_temporal)
    want = int(net.config.in_channels) - int(net.config.out_channels)
    if cond.shape[1] != want:
        raise ValueError(
            f"the image condition has {cond.shape[1]} channels (mask + latent) but the "
            f"transformer takes {want} beside the latents; encode the image with this "
            "model's VAE"
        )
    embeds = None
    if net.config.get("image_dim") is not None:
        clip = batch.get("clip_feature")
        if not isinstance(clip, torch.Tensor) or clip.dim() != 3 or clip.shape[0] != b:
            raise ValueError(
                "batch lacks 'clip_feature' [B, N, D]: the transformer has image "
                "cross-attention (Wan2.1 I2V); preprocess the images with the folder's CLIP "
                "image encoder (fastwan preprocess --task i2v with an image_encoder/ folder)"
            )
        if clip.shape[-1] != int(net.config.image_dim):
            raise ValueError(
                f"batch['clip_feature'] has dim {clip.shape[-1]}, the transformer's image_dim "
                f"is {net.config.image_dim}: encode the images with this model's CLIP"
            )
        embeds = clip.to(device=device, dtype=torch.float32)  # [B, N, D]
    return ImageCondition("i2v", cond, image_embeds=embeds)


def keep_given_frames(x0: torch.Tensor, image: ImageCondition | None) -> torch.Tensor:
    """``x0`` ``[B, C, T, h, w]`` with TI2V's given first frame put back (no gradient
    reaches it); unchanged otherwise."""
    return image.finalize(x0) if image is not None else x0


def generated_frames(x: torch.Tensor, image: ImageCondition | None) -> torch.Tensor:
    """The frames a loss is taken on: all but TI2V's given first frame."""
    return x[:, :, 1:] if image is not None and image.task == "ti2v" else x


def call_transformer(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    *,
    expand_timesteps: bool = False,
    image: ImageCondition | None = None,
) -> torch.Tensor:
    """Velocity ``v = eps - x0`` of a Wan transformer at latents ``x`` ``[B, C, T, H, W]``,
    timesteps ``t`` ``[B]`` in [0, 1000] and text ``cond`` ``[B, L, dim]``; float32.

    expand_timesteps: Wan2.2 TI2V passes one timestep per latent token (``[B, S]``, see
    :func:`fastwan.diffusion.image_condition.per_token_timesteps`) instead of one per sample.
    image: the image condition (:func:`image_condition_of`): TI2V's clean first frame
    merged into ``x`` with timestep 0 on its tokens (each sample at its own ``t``), or
    Wan2.1 I2V's condition channels and CLIP features."""
    # the input layer's dtype (a bf16 Wan keeps scale_shift_table, its first parameter,
    # in float32)
    embed = getattr(net, "patch_embedding", None)
    dtype = embed.weight.dtype if embed is not None else next(net.parameters()).dtype
    t = t.to(torch.float32)  # [B]
    extra = {}
    if image is not None and image.task == "ti2v":
        mask = image.mask.to(x.device, torch.float32)  # [1, 1, T, h, w]
        x = merge_first_frame(x, image.latent.to(x.dtype), mask.to(x.dtype))
        p_t, p_h, p_w = net.config.patch_size
        tokens = mask[0, 0][::p_t, ::p_h, ::p_w].flatten()  # [S]: 0 on the given frame
        t = t[:, None] * tokens[None]  # [B, S]
    elif image is not None:  # Wan2.1 I2V
        x = torch.cat([x, image.latent.to(x.dtype)], dim=1)  # [B, C + 4 + C, T, h, w]
        if image.image_embeds is not None:
            extra["encoder_hidden_states_image"] = image.image_embeds.to(dtype)
    elif expand_timesteps:
        t = per_token_timesteps(t, x.shape, net.config.patch_size)  # [B, S]
    out = net(
        hidden_states=x.to(dtype),
        timestep=t,
        encoder_hidden_states=cond.to(dtype),
        return_dict=False,
        **extra,
    )[0]
    return out.to(torch.float32)  # [B, C, T, H, W]


def _param_device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


class FlowMethod:
    """Flow-matching training of ``transformer`` (trained in place).

    Args:
        transformer: a Wan transformer (e.g. from :func:`fastwan.models.load_transformer`).
        vsa: VSA settings; ``vsa.enabled`` false trains dense attention, else VSA at the
            scheduled sparsity (:meth:`set_step` applies it).
        flow_shift: timestep shift of the sampled noise levels (Wan: 8 / 3 / 5).
        min_ratio, max_ratio: clamp range of the noise level ``s``.
        expand_timesteps: Wan2.2 TI2V -- one timestep per latent token (the folder's
            ``model_index.json`` ``expand_timesteps``).
        lora: train a LoRA adapter (named ``generator``) on the frozen ``transformer``
            instead of the transformer (``rank > 0``; with VSA also its gates,
            ``lora.gates``); ``lora_dtype``: the adapter's dtype (default: the base's);
            ``seed``: seeds its initialisation.
        vae_scale_temporal: pixel frames per latent frame of the folder's VAE (Wan2.1 I2V's
            frame mask; 4 for Wan).

    Image-to-video batches (``first_frame_latent``, see :func:`image_condition_of`) train
    the image-conditioned model; for TI2V the given first frame stays clean in ``x_t`` and
    the loss is taken on the other frames.
    """

    name = "flow"
    roles = ("generator",)

    def __init__(
        self,
        transformer: nn.Module,
        vsa: VSAConfig,
        flow_shift: float = 3.0,
        min_ratio: float = 0.0,
        max_ratio: float = 1.0,
        expand_timesteps: bool = False,
        lora: LoRAConfig | None = None,
        lora_dtype: torch.dtype | None = None,
        seed: int = 0,
        vae_scale_temporal: int = 4,
    ) -> None:
        if not isinstance(transformer, nn.Module):
            raise ValueError(
                f"transformer must be a torch.nn.Module, got {type(transformer).__name__}"
            )
        if not isinstance(vsa, VSAConfig):
            raise ValueError(f"vsa must be a VSAConfig, got {type(vsa).__name__}")
        if not flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0 (1 = no shift), got {flow_shift!r}")
        if not 0.0 <= min_ratio <= max_ratio <= 1.0:
            raise ValueError(
                f"need 0 <= min_ratio <= max_ratio <= 1, got {min_ratio!r}, {max_ratio!r}"
            )
        if (
            isinstance(vae_scale_temporal, bool)
            or not isinstance(vae_scale_temporal, int)
            or (vae_scale_temporal < 1)
        ):
            raise ValueError(
                f"vae_scale_temporal must be a positive int (Wan: 4), got {vae_scale_temporal!r}"
            )
        self.model = transformer
        self.vsa = vsa
        self.expand_timesteps = bool(expand_timesteps)
        self.vae_scale_temporal = vae_scale_temporal
        self.compute_device: torch.device | None = None  # set under FSDP CPU offload
        self.flow_shift = float(flow_shift)
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)
        if lora is not None and not isinstance(lora, LoRAConfig):
            raise ValueError(f"lora must be a LoRAConfig, got {type(lora).__name__}")
        self.lora = lora if lora is not None and lora.enabled else None
        self._lora_seed = int(seed)
        if self.lora is None:
            self.model.requires_grad_(True)
        else:
            attach_adapter(
                self.model,
                "generator",
                self.lora,
                vsa_enabled=vsa.enabled,
                dtype=lora_dtype,
                seed=seed,
            )
            freeze_except_adapters([self.model], [self.trained_parameters("generator")])
        self.model.train()
        self.sparsity: float | None = None
        self.set_step(0)

    @property
    def device(self) -> torch.device:
        """Where the method computes: ``compute_device`` when set (FSDP CPU offload keeps
        the parameters on the CPU), else the device of the trained network."""
        if self.compute_device is not None:
            return self.compute_device
        return _param_device(self.model)

    def networks(self) -> dict[str, nn.Module]:
        """The trainable networks by optimizer role."""
        return {"generator": self.model}

    def frozen_networks(self) -> dict[str, nn.Module]:
        """None: the trained network is the only one."""
        return {}

    def init_adapters(self) -> None:
        """(Re)initialise the adapter from the seed (LoRA; e.g. once a network built on the
        meta device has its memory: the same values on any mesh)."""
        if self.lora is None:
            raise ValueError("this FlowMethod trains no LoRA adapter (lora.rank is 0)")
        init_lora_weights(self.model, "generator", init=self.lora.init, seed=self._lora_seed)

    def trained_parameters(self, role: str) -> dict[str, nn.Parameter]:
        """The whole network, or with LoRA its adapter (and the VSA gates, lora.gates)."""
        if role != "generator":
            raise ValueError(f"FlowMethod has the one role 'generator', not {role!r}")
        if self.lora is None:
            return {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return role_parameters(self.model, role, self.lora, vsa_enabled=self.vsa.enabled)

    def updates(self, step: int) -> tuple[str, ...]:
        """The trained network, every step."""
        del step
        return ("generator",)

    def set_step(self, step: int) -> None:
        """Apply the VSA sparsity of training step ``step`` (0-based) to the model."""
        if not self.vsa.enabled:
            if self.sparsity is None:
                set_attention(self.model, "dense")
                self.sparsity = 0.0
            return
        sparsity = vsa_sparsity_from_config(step, self.vsa)
        if sparsity != self.sparsity:
            set_attention(
                self.model,
                "vsa",
                sparsity=sparsity,
                tile_size=self.vsa.tile_size,
                backend=self.vsa.backend,
            )
            self.sparsity = sparsity

    def loss(
        self, role: str, batch: Mapping[str, Any], rng: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching loss of the trained network (role ``generator``) on ``batch``
        (latents + text, and the image condition of image-to-video batches); noise from
        ``rng``."""
        if role != "generator":
            raise ValueError(f"FlowMethod has the one role 'generator', not {role!r}")
        _check_rng(rng)
        device = self.device
        dtype = next(self.model.parameters()).dtype
        x0 = latents_of(batch, device)  # [B, C, T, H, W]
        cond = text_condition(batch, device, dtype)  # [B, L, dim]
        if cond.shape[0] != x0.shape[0]:
            raise ValueError(f"batch has {x0.shape[0]} latents but {cond.shape[0]} text embeddings")
        s, t = sample_dmd_timesteps(
            x0.shape[0], rng, self.flow_shift, self.min_ratio, self.max_ratio, device
        )  # [B], [B]
        eps = draw_noise(x0.shape, rng, device)  # [B, C, T, H, W]
        image = image_condition_of(
            batch,
            self.model,
            tuple(x0.shape),
            expand_timesteps=self.expand_timesteps,
            vae_scale_temporal=self.vae_scale_temporal,
            device=device,
        )
        x_t = add_noise(x0, eps, s)  # [B, C, T, H, W]
        v = call_transformer(
            self.model, x_t, t, cond, expand_timesteps=self.expand_timesteps, image=image
        )  # [B, C, T, H, W]
        # TI2V: the given first frame is input, not output: no loss on it
        loss = flow_matching_loss(*(generated_frames(y, image) for y in (v, x0, eps)))
        return loss, {"timestep": float(t.mean())}
