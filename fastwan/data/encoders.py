"""The encoders and the teacher of the data commands, built from a Diffusers-format Wan folder.

* :class:`WanTextEncoder`: prompts -> UMT5 embeddings of the valid tokens ``[L_i, dim]``,
  tokenised and cleaned exactly as :class:`fastwan.pipeline.VideoGenerator` does;
* :class:`WanVideoEncoder`: frames ``[T, H, W, 3]`` uint8 -> the VAE posterior mean
  ``[C, T', H', W']``, unnormalised;
* :class:`TeacherSampler`: (prompt, seed[, image]) -> the teacher's multi-step CFG sample,
  as an unnormalised latent ``[C, T, h, w]``;
* :class:`WanImageConditionEncoder`: an image -> its image-to-video condition (VAE
  condition latent, CLIP features) as the pipeline computes it.

Only the components a command needs are loaded (preprocessing never loads the transformer).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "TeacherSampler",
    "WanImageConditionEncoder",
    "WanTextEncoder",
    "WanVideoEncoder",
    "default_device",
    "folder_task",
    "resolve_dtype",
    "vae_latent_stats",
]


def default_device(device: str | None = None) -> torch.device:
    """``device``, else CUDA (this process's ``LOCAL_RANK`` GPU under torchrun) or the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp32 / bf16 / fp16 by name; default bf16 on CUDA, fp32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from fastwan.choices import parse_dtype

    return parse_dtype(name)


def _component_dir(path: Path, name: str, what: str) -> Path:
    sub = path / name
    if not sub.is_dir():
        raise ValueError(
            f"{str(path)!r} has no {name}/ folder; {what} needs a Diffusers-format Wan folder "
            f"with {name}/ (pass the pipeline root with --model)"
        )
    return sub


class WanTextEncoder:
    """UMT5 text encoder: ``__call__(prompts) -> list of [L_i, dim]`` float32 CPU tensors.

    Prompts are cleaned (:func:`fastwan.models.text_encoder.clean_prompt`) and tokenised to
    ``max_length`` as the Wan pipeline does; only each prompt's valid tokens are returned.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        *,
        max_length: int = 512,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.max_length = max_length
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.truncated = 0  # prompts cut to max_length so far

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_length: int = 512,
        batch_size: int = 8,
    ) -> WanTextEncoder:
        from transformers import AutoTokenizer, UMT5EncoderModel

        from fastwan.models.loading import resolve_model_path

        root = resolve_model_path(path)
        dev = default_device(str(device) if device is not None else None)
        dtype = dtype if dtype is not None else resolve_dtype(None, dev)
        encoder = UMT5EncoderModel.from_pretrained(
            str(_component_dir(root, "text_encoder", "text encoding")), dtype=dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(_component_dir(root, "tokenizer", "text encoding"))
        )
        return cls(
            tokenizer,
            encoder.to(dev),
            max_length=max_length,
            device=dev,
            batch_size=batch_size,
        )

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.d_model)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        from fastwan.models.text_encoder import encode_prompts

        if isinstance(prompts, str):
            raise ValueError("encode_text takes a list of prompts, got one string")
        out: list[torch.Tensor] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start : start + self.batch_size])
            emb = encode_prompts(
                self.tokenizer, self.text_encoder, batch, self.max_length, self.device
            )
            out += [h.float().cpu() for h in emb.trimmed()]  # [n, dim] each
            if emb.truncated:  # as the Wan pipeline does; say so rather than lose text silently
                self.truncated += len(emb.truncated)
                warnings.warn(
                    f"{len(emb.truncated)} prompt(s) longer than {self.max_length} tokens were "
                    f"truncated (e.g. {batch[emb.truncated[0][0]][:80]!r}...)",
                    stacklevel=3,  # the caller of __call__ (past torch.no_grad's wrapper)
                )
        return out


class WanVideoEncoder:
    """Wan VAE encoder: ``__call__(frames [T, H, W, 3] uint8) -> [C, T', H', W']`` float32,
    the posterior mean (unnormalised). ``T = 4k + 1``; ``H, W`` multiples of the stride."""

    def __init__(self, vae: torch.nn.Module, *, device: str | torch.device = "cpu") -> None:
        self.vae = vae.eval()
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        tiling: bool = False,
    ) -> WanVideoEncoder:
        from fastwan.models.loading import load_vae, resolve_model_path

        root = resolve_model_path(path)
        dev = default_device(str(device) if device is not None else None)
        vae = load_vae(_component_dir(root, "vae", "video encoding"), dtype=dtype)
        if tiling:
            vae.enable_tiling()
        return cls(vae.to(dev), device=dev)

    @property
    def temporal_stride(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def spatial_stride(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    @property
    def latents_mean(self) -> list[float]:
        return list(self.vae.config.latents_mean)

    @property
    def latents_std(self) -> list[float]:
        return list(self.vae.config.latents_std)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
            raise ValueError("frames must be a uint8 array [T, H, W, 3]")
        t, h, w, c = frames.shape
        st, ss = self.temporal_stride, self.spatial_stride
        if c != 3 or (t - 1) % st or h % ss or w % ss:
            raise ValueError(
                f"frames {frames.shape} must be [{st}k + 1, H, W, 3] with H, W multiples of {ss}"
            )
        x = torch.from_numpy(frames).to(self.device).permute(3, 0, 1, 2)[None]  # [1, 3, T, H, W]
        x = (x.float() / 127.5 - 1.0).to(self.vae.dtype)  # [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean[0].float().cpu()  # [C, T', H', W']


def vae_latent_stats(path: str | Path) -> tuple[list[float], list[float]]:
    """``(latents_mean, latents_std)`` from a Diffusers folder's ``vae/config.json`` (no
    weights loaded): what :class:`fastwan.data.dataset.LatentDataset` normalises with."""
    from fastwan.models.loading import resolve_model_path

    root = resolve_model_path(path)
    config_file = root / "vae" / "config.json"
    if not config_file.is_file():
        config_file = root / "config.json"  # the vae/ folder itself
    if not config_file.is_file():
        raise ValueError(f"{str(path)!r} has no vae/config.json; pass a Wan pipeline folder")
    config = json.loads(config_file.read_text())
    if "latents_mean" not in config or "latents_std" not in config:
        raise ValueError(
            f"{config_file} has no latents_mean / latents_std; pass them to the dataset yourself"
        )
    return list(config["latents_mean"]), list(config["latents_std"])


class TeacherSampler:
    """The teacher's sample of a prompt, unnormalised: ``__call__(prompt, seed)`` (and
    ``image=`` for image-to-video teachers) ->
    ``[C, T, h, w]`` float32 on the CPU (``z * latents_std + latents_mean`` of the
    generator's output, i.e. what ``vae.decode`` takes)."""

    def __init__(
        self,
        generator: Any,  # fastwan.pipeline.VideoGenerator
        *,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: str | None = None,
        flow_shift: float | None = None,
        sampler: str = "scheduler",
        max_sequence_length: int = 512,
    ) -> None:
        self.generator = generator
        self.kwargs = dict(
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            flow_shift=flow_shift,
            sampler=sampler,
            max_sequence_length=max_sequence_length,
        )
        self.negative_prompt = negative_prompt
        # Check the sizes now, not at the first prompt.
        generator.latent_shape(1, height, width, num_frames)
        config = generator.components.vae.config
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(-1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(
            -1, 1, 1, 1
        )

    def __call__(
        self,
        prompt: str,
        seed: int,
        *,
        image: Any = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``image`` (image-to-video teachers): the first frame, resized to the sampler's
        size by the generator; ``image_embeds`` ``[N, D]``: its CLIP embeddings, when
        already computed (Wan2.1 I2V)."""
        extra = {}
        if image is not None:
            embeds = image_embeds[None] if image_embeds is not None else None  # [1, N, D]
            extra = {"image": image, "image_embeds": embeds}
        out = self.generator.generate(
            prompt,
            self.negative_prompt,
            seed=int(seed),
            output_type="latent",
            **self.kwargs,
            **extra,
        )
        z = out.latents[0].float()  # [C, T, h, w], normalised
        return z / self._inv_std + self._mean  # unnormalised, as VideoGenerator.decode does


def folder_task(path: str | Path) -> str:
    """``t2v`` / ``i2v`` / ``ti2v`` of a Diffusers Wan folder from its JSON files alone
    (:func:`fastwan.models.identity.task_of`: model_index.json and, when present, the
    transformer config; no weights read)."""
    from fastwan.models.identity import task_of
    from fastwan.models.loading import resolve_model_path

    root = resolve_model_path(path)
    index_file, config_file = root / "model_index.json", root / "transformer" / "config.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return task_of(index, config)


class WanImageConditionEncoder:
    """The image condition of an image-to-video row, as FastVideo's i2v preprocessing
    writes it and as :meth:`fastwan.pipeline.VideoGenerator.prepare_image_condition`
    computes it at inference (the same functions,
    :func:`fastwan.models.image_encoder.vae_condition_latents`):

    * ``first_frame_latent``: normalised VAE latent of the conditioning video -- for
      Wan2.1 I2V (and text-to-video folders, FastVideo's way) ``[image, 0, ..., 0]`` over
      ``num_frames``, ``[C, T, h, w]``; for Wan2.2 TI2V (``expand_timesteps``, whose
      condition is the clean first latent frame) the image alone, ``[C, 1, h, w]``;
    * ``clip_feature``: CLIP's penultimate hidden states ``[N, D]`` (what Wan2.1 I2V's image
      cross-attention takes), only from folders with ``image_encoder/``; Wan2.2 TI2V has
      none.

    ``__call__(frame [H, W, 3] uint8, num_frames)``: a clip's first frame (``fastwan
    preprocess --task i2v``). :meth:`encode_image` ``(image, height, width, num_frames)``:
    an image file resized as diffusers' ``VideoProcessor`` does (data-free image-to-video
    and synthesis), also returning ``pil_image``."""

    def __init__(
        self,
        vae: torch.nn.Module,
        image_encoder: Any = None,
        processor: Any = None,
        *,
        task: str = "i2v",
    ) -> None:
        from fastwan.choices import TASKS, check_choice

        self.vae = vae.eval()
        self.image_encoder = image_encoder
        self.processor = processor
        self.task = check_choice(task, TASKS, "task")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        vae: torch.nn.Module,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> WanImageConditionEncoder:
        from fastwan.models.image_encoder import load_image_encoder
        from fastwan.models.loading import resolve_model_path

        root = resolve_model_path(path)
        encoder = processor = None
        if (root / "image_encoder").is_dir():
            dev = default_device(str(device) if device is not None else None)
            encoder, processor = load_image_encoder(root, dev, dtype)
        return cls(vae, encoder, processor, task=folder_task(root))

    @property
    def expand_timesteps(self) -> bool:
        return self.task == "ti2v"

    def _encode(
        self, pixels: torch.Tensor, num_frames: int, clip_image: Any
    ) -> dict[str, torch.Tensor | None]:
        """``pixels`` ``[1, 3, H, W]`` in [-1, 1]; ``clip_image``: what CLIP sees."""
        from fastwan.models.image_encoder import clip_image_embeds, vae_condition_latents

        latent = vae_condition_latents(
            self.vae, pixels, num_frames, expand_timesteps=self.expand_timesteps
        )  # [1, C, T or 1, h, w]
        clip = None
        if self.image_encoder is not None:
            clip = clip_image_embeds(self.image_encoder, self.processor, [clip_image])
            clip = clip[0].float().cpu()  # [N, D]
        return {"first_frame_latent": latent[0].cpu(), "clip_feature": clip}

    @torch.no_grad()
    def __call__(self, frame: np.ndarray, num_frames: int) -> dict[str, torch.Tensor | None]:
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3:
            raise ValueError("frame must be a uint8 array [H, W, 3]")
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [1, 3, H, W]
        return self._encode(x, num_frames, frame)

    @torch.no_grad()
    def encode_image(
        self, image: Any, *, height: int, width: int, num_frames: int
    ) -> dict[str, torch.Tensor | None]:
        """The condition of ``image`` (a file path, PIL image or array) for clips of
        ``num_frames x height x width``: ``first_frame_latent``, ``clip_feature`` (of the
        image as given: CLIP's processor resizes it, as diffusers passes the original
        image to ``encode_image``) and ``pil_image`` ``[height, width, 3]`` uint8 (the
        image resized as ``VideoProcessor.preprocess`` does)."""
        from fastwan.models.image_encoder import image_to_tensor, load_image

        img = load_image(image)
        pixels = image_to_tensor(img, height, width)  # [1, 3, H, W] in [-1, 1]
        out = self._encode(pixels, num_frames, img)
        # VideoProcessor maps uint8 v to v / 127.5 - 1: rounding back recovers the pixels
        frame = ((pixels[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        out["pil_image"] = frame.permute(1, 2, 0).contiguous()  # [H, W, 3] uint8
        return out
