"""VideoGenerator: a prompt (and, for image-to-video models, an image) in, a video out, for
Wan and FastWan checkpoints.

text encoder (UMT5) [+ image: CLIP and the VAE's condition latent] -> sampler (3-step DMD
with VSA for FastWan; many-step UniPC with CFG and dense attention for Wan) -> VAE decode.
The components are diffusers' and transformers' own classes; the math mirrors diffusers'
``WanPipeline`` and ``WanImageToVideoPipeline`` (and ``generate`` takes their
``__call__``'s arguments), so with dense attention and the same scheduler, seed and
timesteps both produce the same video.
"""

from __future__ import annotations

import math
import numbers
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastwan.choices import MAX_SEED, OUTPUT_TYPES, SAMPLERS, check_choice, parse_dtype
from fastwan.diffusion.image_condition import (
    ImageCondition,
    default_size_for_image,
    first_frame_mask,
    i2v_condition,
    per_token_timesteps,
)
from fastwan.diffusion.samplers import (
    Callback,
    cfg,
    flow_timesteps,
    sample_dmd,
    sample_euler,
    sample_scheduler,
)
from fastwan.models.compile import compile_blocks, parse_compile
from fastwan.models.identity import ModelIdentity, check_video_size
from fastwan.models.loading import WanComponents, load_components, with_flow_shift
from fastwan.models.presets import WanPreset
from fastwan.models.text_encoder import clean_prompt, encode_prompts
from fastwan.models.vsa import get_attention, set_attention

__all__ = [
    "CALLBACK_TENSOR_INPUTS",
    "GenerationOutput",
    "VideoGenerator",
    "clean_prompt",
    "decode_latents",
    "denoise",
    "image_video_size",
    "parse_dtype",
    "per_token_timesteps",
]

# What callback_on_step_end may read and replace (as diffusers' Wan pipelines name them).
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
# callback_on_step_end(generator, step_index, timestep, tensors) -> tensors to replace
StepEndCallback = Callable[["VideoGenerator", int, float, dict], dict | None]


@dataclass
class GenerationOutput:
    """Result of :meth:`VideoGenerator.generate` (``frames`` as diffusers'
    ``WanPipelineOutput.frames`` for the ``output_type``)."""

    # "np": [B, F, H, W, 3] float32 in [0, 1]; "pt": [B, F, 3, H, W] float32 tensor;
    # "pil": B lists of F PIL images; "latent": None (see latents)
    frames: Any
    latents: torch.Tensor  # [B, C, T, h, w] float32 on the CPU: the denoised latents
    timings: dict[str, float]  # seconds: text_encode, image_encode, denoise, decode, total
    prompts: list[str]
    seed: int | None
    fps: int
    sampler: str
    timesteps: list[float] = field(default_factory=list)  # the timesteps the model saw
    # sampling setting -> where its value came from ("argument", "scheduler_config.json", ...)
    sampling_sources: dict[str, str] = field(default_factory=dict)
    height: int = 0  # the video's size (for image-to-video: as chosen from the image)
    width: int = 0
    num_frames: int = 0

    @property
    def video(self) -> Any:
        """The first video (``[F, H, W, 3]`` for ``output_type="np"``)."""
        if self.frames is None:
            raise ValueError("no frames: generate(..., output_type='np') decodes them")
        return self.frames[0]


class VideoGenerator:
    """Text- and image-to-video with a Wan / FastWan Diffusers checkpoint.

    >>> gen = VideoGenerator.from_pretrained("FastVideo/FastWan2.1-T2V-1.3B-Diffusers")
    >>> out = gen.generate("a red fox running through snow", seed=0)
    >>> save_video(out.video, "fox.mp4", fps=out.fps)

    Image-to-video models (Wan2.2 TI2V, Wan2.1 I2V) take ``generate(..., image=...)``.
    """

    def __init__(
        self,
        components: WanComponents,
        *,
        device: str | torch.device | None = None,
        cpu_offload: bool = False,
        compile: bool | str = False,
        vae_tiling: bool = False,
    ) -> None:
        self.compile_backend = parse_compile(compile)
        if not isinstance(vae_tiling, bool):
            raise ValueError(f"vae_tiling must be True or False, got {vae_tiling!r}")
        if vae_tiling and not hasattr(components.vae, "enable_tiling"):
            raise ValueError(
                f"vae_tiling: {type(components.vae).__name__} has no enable_tiling(); "
                "pass vae_tiling=False"
            )
        self.components = components
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        # Offloading only means something when the compute device is not the CPU.
        self.cpu_offload = bool(cpu_offload) and self.device.type != "cpu"
        if not self.cpu_offload:
            for module in self._modules():
                if _device_of(module) != self.device:
                    module.to(self.device)
        if self.compile_backend is not None:
            compile_blocks(components.transformer, backend=self.compile_backend)
        self.vae_tiling = vae_tiling
        if vae_tiling:  # decode in overlapping spatial tiles: bounded memory at any size
            components.vae.enable_tiling()
        # How CFG combines its branches: None = both on this device (samplers.cfg); CFG
        # parallel (fastwan.multi_device) puts one branch on each half of the devices.
        self.guidance: Callable | None = None

    def _modules(self) -> list[torch.nn.Module]:
        c = self.components
        mods = (c.text_encoder, c.transformer, c.vae, c.image_encoder)
        return [m for m in mods if m is not None]

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        preset: str | WanPreset | None = None,
        attention: str | None = None,
        sparsity: float | None = None,
        tile_size: Sequence[int] | None = None,
        backend: str = "auto",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        vae_dtype: str | torch.dtype = torch.float32,
        cpu_offload: bool = False,
        compile: bool | str = False,
        vae_tiling: bool = False,
        strict: bool = False,
        num_gpus: int = 1,
        cfg_parallel: bool = True,
        fsdp: bool = False,
    ) -> VideoGenerator:
        """Load a Diffusers-format Wan folder (or hub id / preset name).

        Sampling defaults come from the folder's own files (``model_index.json``, the
        scheduler config, the transformer config and its VSA gates, fastwan's
        ``fastwan.json``), then ``preset`` or a known preset matched by name or
        architecture, then diffusers' ``WanPipeline`` defaults; ``gen.sampling_sources``
        says where each came from. strict: incomplete VSA gates or unknown weights are
        errors (otherwise warnings naming them).

        attention: ``"vsa"`` or ``"dense"``; default the preset's (VSA for FastWan).
        sparsity: VSA sparsity; default the preset's. dtype: default bf16 on CUDA, fp32 on
        CPU (the VAE runs in ``vae_dtype``). cpu_offload: keep components on the CPU and
        move each to ``device`` only for its stage. compile: ``torch.compile`` each
        transformer block (``True`` = inductor, or a backend name; the first generation
        at a new size pays the compile). vae_tiling: decode in overlapping spatial tiles
        (diffusers' ``enable_tiling``) to bound the VAE's memory at large sizes.

        num_gpus > 1: one video on that many devices (worker processes fastwan starts, or
        the ranks of ``torchrun``): sequence parallel, CFG parallel (``cfg_parallel``) and,
        with ``fsdp=True``, the transformer's weights sharded over the devices; returns a
        :class:`fastwan.multi_device.MultiDeviceGenerator` with the same ``generate``.
        """
        if num_gpus != 1:
            from fastwan.multi_device import MultiDeviceGenerator

            if cpu_offload or compile:
                raise ValueError(
                    "num_gpus > 1 runs without cpu_offload / compile; pass num_gpus=1 for them"
                )
            return MultiDeviceGenerator(  # type: ignore[return-value]
                path_or_id,
                num_gpus,
                device=None if device is None else str(device),
                cfg_parallel=cfg_parallel,
                fsdp=fsdp,
                preset=preset,
                attention=attention,
                sparsity=sparsity,
                tile_size=tile_size,
                backend=backend,
                dtype=None if dtype is None else str(dtype).removeprefix("torch."),
                vae_dtype=str(vae_dtype).removeprefix("torch."),
                vae_tiling=vae_tiling,
                strict=strict,
            )
        if fsdp:
            raise ValueError("fsdp=True shards over several devices: pass num_gpus > 1")
        dev = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        components = load_components(
            path_or_id,
            preset=preset,
            dtype=default_dtype(dev) if dtype is None else parse_dtype(dtype),
            vae_dtype=parse_dtype(vae_dtype, field="vae_dtype"),
            strict=strict,
        )
        apply_attention(components, attention, sparsity, tile_size, backend)
        return cls(
            components,
            device=dev,
            cpu_offload=cpu_offload,
            compile=compile,
            vae_tiling=vae_tiling,
        )

    @classmethod
    def from_modules(
        cls,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        *,
        scheduler: Any = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        expand_timesteps: bool = False,
        device: str | torch.device | None = None,
        **sampling: Any,
    ) -> VideoGenerator:
        """A generator around networks already in memory (training's validation runs the
        student through it), as they are: nothing is moved or re-wired. Without a text
        encoder prompts come as ``prompt_embeds``; ``sampling``: defaults such as
        ``flow_shift`` or ``fps`` (:class:`WanPreset` fields)."""
        from pathlib import Path

        from fastwan.models.identity import identity_of_modules

        identity = identity_of_modules(
            dict(transformer.config),
            dict(vae.config),
            name=type(transformer).__name__,
            expand_timesteps=expand_timesteps,
            **sampling,
        )
        components = WanComponents(
            path=Path("."),
            model_index={},
            identity=identity,
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
        )
        if device is None:
            device = _device_of(transformer) or "cpu"
        return cls(components, device=device)

    @property
    def preset(self) -> WanPreset:
        """The effective sampling defaults of the loaded model."""
        return self.components.preset

    @property
    def identity(self) -> ModelIdentity:
        return self.components.identity

    @property
    def task(self) -> str:
        """``"t2v"``, ``"ti2v"`` (text or text + first frame) or ``"i2v"`` (needs an image)."""
        return self.identity.task

    @property
    def takes_last_image(self) -> bool:
        """Whether this is a first-last-frame model (Wan2.1 FLF2V: image cross-attention
        whose position table holds two images, transformer config ``pos_embed_seq_len``): it
        takes ``last_image=`` beside ``image=``, and needs both."""
        config = self.transformer.config
        return config.get("image_dim") is not None and bool(config.get("pos_embed_seq_len"))

    @property
    def sampling_sources(self) -> dict[str, str]:
        """Sampling setting -> the file, preset or default its value came from."""
        return dict(self.components.sampling_sources)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.components.transformer

    def set_attention(
        self,
        mode: str,
        *,
        sparsity: float | None = None,
        tile_size: Sequence[int] | None = None,
        backend: str = "auto",
    ) -> None:
        """Switch the transformer's self-attention (``"vsa"`` / ``"dense"``) in place
        (``tile_size``: default the preset's)."""
        tile_size = self.preset.tile_size if tile_size is None else tile_size
        set_attention(
            self.transformer, mode, sparsity=sparsity, tile_size=tile_size, backend=backend
        )

    @property
    def attention(self) -> dict:
        return get_attention(self.transformer)

    # ----------------------------------------------------------------- LoRA
    def load_lora(
        self, path: str | Path, scale: float = 1.0, adapter_name: str | None = None
    ) -> str:
        """Load a diffusers-format Wan LoRA (a ``.safetensors`` file, or a folder such as
        ``fastwan export`` writes, whose VSA gates come with it; original-Wan and musubi
        keys are converted as diffusers converts them) into the transformer at strength
        ``scale`` (1 = as trained) and return its adapter name. ``adapter_name`` None:
        one derived from the file or folder name, made unique, so loading two LoRAs never
        clashes; their effects add up. Same result as diffusers' ``load_lora_weights`` +
        ``set_adapters(name, scale)``. See :func:`fastwan.models.lora.load_lora`."""
        from fastwan.models.lora import adapter_names, load_lora

        taken = adapter_names(self.transformer)
        if adapter_name is None:
            adapter_name = _unique_adapter_name(Path(path), taken)
        return load_lora(self.transformer, path, scale=scale, adapter_name=adapter_name)

    def set_lora_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """Set adapter ``adapter_name``'s strength (every loaded adapter: None); 0 turns
        it off without unloading it."""
        from fastwan.models.lora import set_lora_scale

        set_lora_scale(self.transformer, scale, adapter_name)

    def unload_lora(self, adapter_name: str | None = None) -> None:
        """Remove adapter ``adapter_name`` (every adapter: None) and the VSA gates its
        folder brought: the generator computes what it did before loading it."""
        from fastwan.models.lora import unload_lora

        unload_lora(self.transformer, adapter_name)

    @property
    def loras(self) -> dict[str, float]:
        """Loaded adapters, in load order: name -> scale (as :meth:`set_lora_scale` set
        it; peft keeps ``scale x alpha / rank`` per layer)."""
        from fastwan.models.lora import adapter_names, lora_layers

        scales: dict[str, float] = {}
        for _, layer in lora_layers(self.transformer):
            for name in layer.lora_A.keys():
                if name not in scales:
                    rank = layer.r[name]
                    root = math.sqrt(rank) if layer.use_rslora.get(name, False) else rank
                    # undo peft's scale x alpha / rank; rounded: 0.7 stays 0.7
                    scales[name] = round(layer.scaling[name] * root / layer.lora_alpha[name], 12)
        return {n: scales[n] for n in adapter_names(self.transformer)}

    # ----------------------------------------------------------------- geometry
    @property
    def vae_scale(self) -> tuple[int, int]:
        """(temporal, spatial) downsampling of the VAE."""
        cfg_ = self.components.vae.config
        return int(cfg_.scale_factor_temporal), int(cfg_.scale_factor_spatial)

    @property
    def latent_channels(self) -> int:
        """Channels of the generated latents (the VAE's; Wan2.1 I2V's transformer takes
        4 + 16 more as its condition)."""
        return int(self.components.vae.config.z_dim)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple:
        """``[B, C, T, h, w]`` for a video, or a ValueError naming the nearest valid sizes
        (or the model's largest, past its rotary position table)."""
        check_video_size(self.identity, height, width, num_frames)
        st, ss = self.vae_scale
        return (batch, self.latent_channels, (num_frames - 1) // st + 1, height // ss, width // ss)

    def default_size_for_image(self, image: Any) -> tuple[int, int]:
        """``(height, width)`` of a video from ``image`` (:func:`image_video_size`)."""
        return image_video_size(self.identity, image)

    # ----------------------------------------------------------------- stages
    @contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if not self.cpu_offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def encode_prompt(
        self, prompts: list[str], max_sequence_length: int | None = None
    ) -> torch.Tensor:
        """UMT5 embeddings ``[B, L, text_dim]``: padding positions beyond each prompt's
        tokens are zeroed, as the Wan pipeline does. ``L`` defaults to the preset's
        ``text_length`` (512 for Wan)."""
        c = self.components
        if c.text_encoder is None or c.tokenizer is None:
            raise ValueError(
                "this generator has no text encoder: pass prompt_embeds= (and "
                "negative_prompt_embeds= for CFG)"
            )
        if max_sequence_length is None:
            max_sequence_length = self.preset.text_length
        with self._on_device(c.text_encoder) as encoder:
            emb = encode_prompts(c.tokenizer, encoder, prompts, max_sequence_length, self.device)
        if emb.truncated:
            i, n = emb.truncated[0]
            warnings.warn(
                f"{len(emb.truncated)} prompt(s) are longer than the model's "
                f"{max_sequence_length} text tokens; their last tokens are dropped (prompt "
                f"{i}: {n} tokens): shorten the prompt, or pass a larger max_sequence_length",
                stacklevel=3,
            )
        return emb.hidden  # [B, L, text_dim]

    @torch.no_grad()
    def encode_image(self, images: list[Any]) -> torch.Tensor:
        """CLIP embeddings ``[len(images), N, D]`` for Wan2.1 I2V's image cross-attention
        (diffusers' ``encode_image``: the penultimate hidden states)."""
        from fastwan.models.image_encoder import clip_image_embeds

        c = self.components
        if c.image_encoder is None:
            raise ValueError(f"{self.preset.name!r} has no image encoder (CLIP)")
        with self._on_device(c.image_encoder) as encoder:
            return clip_image_embeds(encoder, c.image_processor, images)

    @torch.no_grad()
    def prepare_image_condition(
        self,
        image: Any,
        *,
        batch: int,
        height: int,
        width: int,
        num_frames: int,
        last_image: Any = None,
        image_embeds: torch.Tensor | None = None,
    ) -> ImageCondition:
        """The :class:`ImageCondition` of ``image`` (and ``last_image``; each a list of one
        per prompt, or one for all) for ``batch`` videos of ``num_frames x height x width``:
        the VAE latent of the conditioning video (each image resized as diffusers'
        ``VideoProcessor`` does) and, for Wan2.1 I2V, the CLIP embeddings (``image_embeds``
        when given: ``[k, N, D]`` for all images or ``[len(images) * k, N, D]``, ``k`` = 2
        with last frames)."""
        from fastwan.models.image_encoder import image_to_tensor, vae_condition_latents

        ti2v = self.task == "ti2v"
        listed = isinstance(image, (list, tuple))
        images = list(image) if listed else [image]
        lasts = (
            list(last_image) if listed and last_image is not None else [last_image] * len(images)
        )
        if batch % len(images):
            raise ValueError(f"batch {batch} is not a multiple of the {len(images)} images")
        per_image = batch // len(images)  # num_videos_per_prompt: prompt-major as the text
        latents = []
        with self._on_device(self.components.vae) as vae:  # moved once for all the images
            for first, last in zip(images, lasts):
                pixels = image_to_tensor(first, height, width)  # [1, 3, H, W] in [-1, 1]
                end = image_to_tensor(last, height, width) if last is not None else None
                latents.append(
                    vae_condition_latents(
                        vae,
                        pixels.to(self.device),
                        num_frames,
                        expand_timesteps=ti2v,
                        last_image=end.to(self.device) if end is not None else None,
                    )
                )  # [1, C, 1 or T, h, w] float32
        # [B, C, 1 or T, h, w]
        latent = torch.cat(latents).to(self.device).repeat_interleave(per_image, dim=0)
        if ti2v:
            _, _, t, h, w = self.latent_shape(batch, height, width, num_frames)
            mask = first_frame_mask(t, h, w, device=self.device)
            return ImageCondition("ti2v", latent, mask=mask)
        has_last = last_image is not None
        embeds = None
        if self.transformer.config.get("image_dim") is not None:
            k = 2 if has_last else 1  # CLIP rows per video: first (and last) frame
            if image_embeds is None:
                frames = [im for pair in zip(images, lasts) for im in pair if im is not None]
                image_embeds = self.encode_image(frames)  # [len(images) * k, N, D]
            rows = image_embeds.to(self.device)
            if rows.shape[0] == k:  # one embedding for every image
                rows = rows.repeat(len(images), 1, 1)
            # [B * k, N, D] in video order; a first-last-frame transformer views each pair
            # as [B, 2N, D]
            embeds = rows.unflatten(0, (len(images), k)).repeat_interleave(per_image, dim=0)
            embeds = embeds.flatten(0, 1)
        channels = i2v_condition(latent, num_frames, self.vae_scale[0], last_image=has_last)
        return ImageCondition("i2v", channels, image_embeds=embeds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents ``[B, C, T, h, w]`` -> frames ``[B, F, H, W, 3]`` float32 in [0, 1]."""
        with self._on_device(self.components.vae) as vae:
            return decode_latents(vae, latents, device=self.device)

    # ----------------------------------------------------------------- generate
    def _plan_sampler(self, sampler, timesteps, num_inference_steps):
        p = self.preset
        if timesteps is not None and num_inference_steps is not None:
            raise ValueError(
                "pass either timesteps= (few-step DMD) or num_inference_steps= (multi-step), "
                "not both"
            )
        if sampler is None:
            if timesteps is not None or (num_inference_steps is None and p.few_step):
                sampler = "dmd"
            else:
                sampler = "scheduler"
        check_choice(sampler, SAMPLERS, "sampler")
        if sampler == "dmd":
            if num_inference_steps is not None:
                raise ValueError("the dmd sampler takes timesteps=, not num_inference_steps=")
            if timesteps is None:
                if not p.few_step:
                    raise ValueError(
                        f"preset {p.name!r} has no few-step timesteps; pass timesteps= (e.g. "
                        "[1000, 757, 522]) or use sampler='scheduler'"
                    )
                timesteps = p.timesteps
            return sampler, list(timesteps), None
        if timesteps is not None:
            raise ValueError(f"sampler {sampler!r} takes num_inference_steps=, not timesteps=")
        steps = p.num_inference_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
        return sampler, None, steps

    def generate(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        image: Any = None,
        last_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        sampler: str | None = None,
        flow_shift: float | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback: Callback | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> GenerationOutput | tuple:
        """Generate ``num_videos_per_prompt`` videos per prompt (diffusers' ``WanPipeline``
        / ``WanImageToVideoPipeline.__call__`` arguments, plus fastwan's samplers).

        image / last_image: the first (and last) frame, for image-to-video models (a PIL
        image, a file path, an ``[H, W, 3]`` array or a tensor), or a list of them, one per
        prompt, to batch different images in one call (diffusers takes one); sizes then
        default to the image's aspect ratio at the preset's pixel count (``out.height`` /
        ``out.width``), and the image is resized to the size as diffusers'
        ``VideoProcessor`` does.
        Sizes otherwise default to the preset's. ``timesteps`` -> few-step DMD;
        ``num_inference_steps`` -> multi-step (``sampler``: ``"scheduler"``, the checkpoint's
        diffusers scheduler, UniPC for Wan; ``"unipc"``; or ``"euler"``); neither -> the
        preset's way. ``guidance_scale`` > 1 runs CFG with ``negative_prompt`` (default: the
        preset's). Randomness comes from ``generator``, else a CPU generator seeded with
        ``seed``; ``latents`` replaces the initial noise. ``prompt_embeds`` /
        ``negative_prompt_embeds`` ``[B, L, dim]`` replace the text encoder; ``image_embeds``
        the CLIP encoder. ``output_type``: ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``;
        ``return_dict=False`` returns ``(frames,)`` (latents for ``"latent"``).
        ``callback(info)`` sees ``{"i", "total", "t", "x"}`` after each step;
        ``callback_on_step_end(generator, i, t, tensors)`` sees the tensors named by
        ``callback_on_step_end_tensor_inputs`` and may return replacements.
        """
        t_start = time.perf_counter()
        p = self.preset
        plan = self.check_inputs(
            prompt,
            negative_prompt,
            image=image,
            last_image=last_image,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            guidance_scale=guidance_scale,
            num_videos_per_prompt=num_videos_per_prompt,
            seed=seed,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            image_embeds=image_embeds,
            sampler=sampler,
            flow_shift=flow_shift,
            max_sequence_length=max_sequence_length,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        prompts = plan["prompts"]
        shape, name, ts, steps = plan["shape"], plan["sampler"], plan["timesteps"], plan["steps"]
        scale, shift = plan["guidance_scale"], plan["flow_shift"]
        max_sequence_length = plan["max_sequence_length"]
        n = num_videos_per_prompt
        own_generator = generator is not None
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))

        timings = {}
        t0 = time.perf_counter()
        cond = (
            prompt_embeds
            if prompt_embeds is not None
            else self.encode_prompt(prompts, max_sequence_length)
        )
        uncond = None
        if scale > 1.0:
            if negative_prompt_embeds is not None:
                uncond = negative_prompt_embeds
            else:
                neg = p.negative_prompt if negative_prompt is None else negative_prompt
                negs = [neg] * cond.shape[0] if isinstance(neg, str) else list(neg)  # checked
                uncond = self.encode_prompt(negs, max_sequence_length)
        # as diffusers: each prompt's embedding repeated for its videos, prompt-major
        cond = cond.to(self.device).repeat_interleave(n, dim=0)  # [B * n, L, dim]
        uncond = uncond.to(self.device).repeat_interleave(n, dim=0) if uncond is not None else None
        self._sync()
        timings["text_encode"] = time.perf_counter() - t0

        if latents is None:
            noise = torch.randn(
                shape, generator=generator, device=generator.device, dtype=torch.float32
            )
        else:
            noise = latents.to(torch.float32)
        noise = noise.to(self.device)  # [B * n, C, T, h, w]

        condition = None
        if plan["image"] is not None:
            t0 = time.perf_counter()
            condition = self.prepare_image_condition(
                plan["image"],
                batch=shape[0],
                height=plan["height"],
                width=plan["width"],
                num_frames=plan["num_frames"],
                last_image=plan["last_image"],
                image_embeds=image_embeds,
            )
            self._sync()
            timings["image_encode"] = time.perf_counter() - t0

        embeds = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
        step_end = None
        if callback is not None or callback_on_step_end is not None:
            step_end = self._step_end(
                callback, callback_on_step_end, callback_on_step_end_tensor_inputs, embeds
            )
        t0 = time.perf_counter()
        with torch.no_grad(), self._on_device(self.transformer):
            result, seen = denoise(
                self.transformer,
                noise,
                cond,
                sampler=name,
                timesteps=ts,
                num_inference_steps=steps,
                uncond=uncond,
                guidance_scale=scale,
                flow_shift=shift,
                scheduler=self.components.scheduler,
                generator=generator,
                expand_timesteps=self.components.expand_timesteps,
                condition=condition,
                callback=step_end,
                embeds=embeds,
                guidance=self.guidance,
            )
        self._sync()
        timings["denoise"] = time.perf_counter() - t0

        frames = None
        t0 = time.perf_counter()
        if output_type != "latent":
            frames = _postprocess(self.decode(result), output_type)
        self._sync()
        timings["decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        if not return_dict:
            return (frames if output_type != "latent" else result,)
        return GenerationOutput(
            frames=frames,
            latents=result.float().cpu(),
            timings=timings,
            prompts=[q for q in prompts or () for _ in range(n)],
            seed=None if own_generator or seed is None else int(seed),
            fps=p.fps,
            sampler=name,
            timesteps=seen,
            sampling_sources=plan["sources"],
            height=plan["height"],
            width=plan["width"],
            num_frames=plan["num_frames"],
        )

    def _step_end(self, callback, step_end, names, embeds: dict) -> Callback:
        """One sampler callback: fastwan's ``callback(info)`` and diffusers'
        ``callback_on_step_end`` (whose returned embeddings the next step uses)."""

        def on_step(info: dict) -> torch.Tensor | None:
            if callback is not None:
                callback(info)
            if step_end is None:
                return None
            tensors = {"latents": info["x"], **embeds}
            out = step_end(self, info["i"], info["t"], {k: tensors[k] for k in names}) or {}
            for key in ("prompt_embeds", "negative_prompt_embeds"):
                if out.get(key) is not None:
                    embeds[key] = out[key]
            return out.get("latents")

        return on_step

    def check_inputs(
        self,
        prompt=None,
        negative_prompt=None,
        *,
        image=None,
        last_image=None,
        height=None,
        width=None,
        num_frames=None,
        num_inference_steps=None,
        timesteps=None,
        guidance_scale=None,
        num_videos_per_prompt=1,
        seed=0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        image_embeds=None,
        sampler=None,
        flow_shift=None,
        max_sequence_length=None,
        output_type="np",
        return_dict=True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ) -> dict:
        """Check every argument of :meth:`generate` before any work (a ValueError naming the
        argument and the fix) and resolve the defaults; returns the plan: ``prompts``, the
        latent ``shape``, ``height`` / ``width`` / ``num_frames``, ``image`` /
        ``last_image`` (loaded), ``sampler``, ``timesteps`` / ``steps``,
        ``guidance_scale``, ``flow_shift``, ``max_sequence_length`` and each setting's
        ``sources``."""
        p = self.preset
        prompts = self._check_prompts(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds
        )
        n = num_videos_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_videos_per_prompt must be an int >= 1, got {n!r}")
        given_length = max_sequence_length
        if max_sequence_length is None:
            max_sequence_length = p.text_length
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int):
            raise ValueError(f"max_sequence_length must be an int, got {max_sequence_length!r}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        check_choice(output_type, OUTPUT_TYPES, "output_type")
        if not isinstance(return_dict, bool):
            raise ValueError(f"return_dict must be True or False, got {return_dict!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("callback_on_step_end must be callable(generator, i, t, tensors)")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: {bad} are not among "
                f"{list(CALLBACK_TENSOR_INPUTS)}"
            )
        n_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        image, last_image, image_size = self._check_images(
            image, last_image, image_embeds, n_prompts
        )
        if isinstance(image_size, set) and (height is None or width is None):
            raise ValueError(
                f"image: the listed images' aspect ratios give different sizes "
                f"{sorted(image_size)}; pass height and width (each image is then resized "
                "and cropped to them)"
            )
        given = dict(
            height=height,
            width=width,
            num_frames=num_frames,
            guidance_scale=guidance_scale,
            flow_shift=flow_shift,
            negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length,
        )
        sources = {k: self.identity.sources.get(k, "default") for k in given}
        if image_size is not None and height is None and width is None:
            height, width = image_size
            sources["height"] = sources["width"] = "image aspect ratio"
        elif image_size is not None and (height is None) != (width is None):
            raise ValueError(
                "with image=, pass both height and width, or neither (then they follow the "
                "image's aspect ratio)"
            )
        height = p.height if height is None else height
        width = p.width if width is None else width
        num_frames = p.num_frames if num_frames is None else num_frames
        batch = n_prompts * n
        shape = self.latent_shape(batch, height, width, num_frames)
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
                raise ValueError(
                    f"latents must be a tensor of shape {shape} (videos, channels, latent "
                    f"frames, height / {self.vae_scale[1]}, width / {self.vae_scale[1]}), got {got}"
                )
            if not torch.isfinite(latents).all():
                raise ValueError("latents hold NaN or infinite values")
        if timesteps is not None:
            timesteps = list(timesteps)
            if not timesteps or not all(_is_finite_number(t) and 0 < t <= 1000 for t in timesteps):
                raise ValueError(
                    f"timesteps must be finite numbers in (0, 1000], got {timesteps!r}"
                )
        name, ts, steps = self._plan_sampler(sampler, timesteps, num_inference_steps)
        scale = p.guidance_scale if guidance_scale is None else guidance_scale
        if not _is_finite_number(scale) or scale <= 0:
            raise ValueError(
                f"guidance_scale must be a finite number > 0 (1 disables CFG), got {scale!r}"
            )
        if scale > 1.0 and prompt_embeds is not None and negative_prompt_embeds is None:
            raise ValueError(
                f"guidance_scale {scale} runs CFG: with prompt_embeds= pass "
                "negative_prompt_embeds= too (or guidance_scale=1)"
            )
        shift = p.flow_shift if flow_shift is None else flow_shift
        if not _is_finite_number(shift) or shift <= 0:
            raise ValueError(f"flow_shift must be a finite number > 0, got {shift!r}")
        if generator is None:
            if seed is None:
                raise ValueError("pass seed= (an int) or generator= (a torch.Generator)")
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
        elif not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator)}")
        sources.update({k: "argument" for k, v in given.items() if v is not None})
        if given_length is None:
            sources["max_sequence_length"] = self.identity.sources.get("text_length", "default")
        if name == "dmd":
            sources["timesteps"] = (
                "argument"
                if timesteps is not None
                else self.identity.sources.get("timesteps", "default")
            )
        else:
            sources["num_inference_steps"] = (
                "argument"
                if num_inference_steps is not None
                else self.identity.sources.get("num_inference_steps", "default")
            )
        sources["sampler"] = "argument" if sampler is not None else "timesteps / steps"
        return dict(
            prompts=prompts,
            shape=shape,
            height=height,
            width=width,
            num_frames=num_frames,
            image=image,
            last_image=last_image,
            sampler=name,
            timesteps=ts,
            steps=steps,
            guidance_scale=float(scale),
            flow_shift=float(shift),
            max_sequence_length=max_sequence_length,
            sources=sources,
        )

    def _check_prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """The prompts as a list (``None`` with ``prompt_embeds``), or a ValueError."""
        dim = self.transformer.config.get("text_dim")
        for key, emb in (
            ("prompt_embeds", prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds),
        ):
            if emb is None:
                continue
            if not isinstance(emb, torch.Tensor) or emb.dim() != 3:
                raise ValueError(f"{key} must be a [batch, tokens, text_dim] tensor")
            if dim is not None and emb.shape[-1] != dim:
                raise ValueError(
                    f"{key} has {emb.shape[-1]} features; the transformer's text_dim is {dim}"
                )
            if not torch.isfinite(emb).all():
                raise ValueError(f"{key} holds NaN or infinite values")
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass prompt= or prompt_embeds=, not both")
            if negative_prompt is not None and negative_prompt_embeds is not None:
                raise ValueError("pass negative_prompt= or negative_prompt_embeds=, not both")
            if negative_prompt is not None:
                raise ValueError(
                    "with prompt_embeds= pass the negative side as negative_prompt_embeds="
                )
            if negative_prompt_embeds is not None and (
                negative_prompt_embeds.shape != prompt_embeds.shape
            ):
                raise ValueError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have "
                    f"prompt_embeds' shape {tuple(prompt_embeds.shape)}"
                )
            return None
        if negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds= needs prompt_embeds= (or pass prompts)")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(prompts, (list, tuple))
            or not prompts
            or not all(isinstance(x, str) and x.strip() for x in prompts)
        ):
            raise ValueError("prompt must be a non-empty string or a list of them")
        if negative_prompt is not None:
            # one string is every prompt's negative (diffusers); a list is one per prompt
            negs = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negs, (list, tuple)) or not all(isinstance(x, str) for x in negs):
                raise ValueError("negative_prompt must be a string or a list of strings")
            if not isinstance(negative_prompt, str) and len(negs) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negs)} entries for {len(prompts)} prompts; pass "
                    "one string or one per prompt"
                )
        return list(prompts)

    def _check_images(self, image, last_image, image_embeds, n_prompts: int):
        """(image, last_image) as PIL images, lists of them (one per prompt) or None, and
        the default size of the image(s) (a set of sizes when listed images disagree), or
        a ValueError saying which model takes what."""
        from fastwan.models.image_encoder import load_image

        task, name = self.task, self.preset.name
        if image is None:
            if task == "i2v":
                raise ValueError(
                    f"{name!r} is an image-to-video model: pass image= (the first frame)"
                )
            if last_image is not None or image_embeds is not None:
                raise ValueError("last_image= / image_embeds= need image= (the first frame)")
            return None, None, None
        if task == "t2v":
            raise ValueError(
                f"image: {name!r} is a text-to-video model; image-to-video needs a Wan2.2 "
                "TI2V or Wan2.1 I2V checkpoint"
            )
        if task == "ti2v" and last_image is not None:
            raise ValueError(
                f"last_image: {name!r} (Wan2.2 TI2V) takes the first frame only; a last frame "
                "needs a Wan2.1 I2V / FLF2V checkpoint"
            )
        clip = self.transformer.config.get("image_dim") is not None
        if last_image is not None and clip and not self.takes_last_image:
            raise ValueError(
                f"last_image: {name!r} is an image-to-video model of the first frame; a last "
                "frame needs a first-last-frame (FLF2V) checkpoint, whose transformer config "
                "sets pos_embed_seq_len"
            )
        if last_image is None and self.takes_last_image:
            # diffusers fails deep inside (a position-embedding shape mismatch) here
            raise ValueError(
                f"last_image: {name!r} is a first-last-frame (FLF2V) model (its transformer "
                "config sets pos_embed_seq_len): pass last_image= (the last frame) too"
            )
        if image_embeds is not None:
            if not clip:
                raise ValueError(f"image_embeds: {name!r} has no image cross-attention")
            if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3:
                raise ValueError("image_embeds must be a [1, tokens, dim] tensor")
        k = 1 if last_image is None else 2  # CLIP rows per video
        if isinstance(image, (list, tuple)):
            # one image per prompt: a batch of different first frames in one call
            if len(image) != n_prompts:
                raise ValueError(
                    f"image: a list of {len(image)} images for {n_prompts} prompt(s); pass one "
                    "image per prompt, or a single image for all of them"
                )
            if last_image is not None and (
                not isinstance(last_image, (list, tuple)) or len(last_image) != n_prompts
            ):
                raise ValueError(
                    f"last_image: with a list of images, pass a list of {n_prompts} last frames"
                )
            if image_embeds is not None and image_embeds.shape[0] not in (k, n_prompts * k):
                raise ValueError(
                    f"image_embeds: {image_embeds.shape[0]} rows; with {n_prompts} images pass "
                    f"{n_prompts * k} (one per image{' and last frame' if k == 2 else ''}) or {k}"
                )
            imgs = [load_image(im, f"image[{i}]") for i, im in enumerate(image)]
            lasts = (
                [load_image(im, f"last_image[{i}]") for i, im in enumerate(last_image)]
                if last_image is not None
                else None
            )
            sizes = {self.default_size_for_image(im) for im in imgs}
            return imgs, lasts, sizes.pop() if len(sizes) == 1 else sizes
        if isinstance(last_image, (list, tuple)):
            raise ValueError("last_image: a list of last frames needs a list of images")
        img = load_image(image, "image")
        last = load_image(last_image, "last_image") if last_image is not None else None
        return img, last, self.default_size_for_image(img)


def _unique_adapter_name(path: Path, taken: Sequence[str]) -> str:
    """An adapter name for the LoRA at ``path``: its folder's name for a folder or a file
    with diffusers' default name, else the file's stem; characters peft does not allow in
    a name (dots) become ``_``; ``_2``, ``_3``, ... when ``taken`` has it."""
    from fastwan.models.lora import LORA_FILE

    source = path.parent if path.name == LORA_FILE else path
    stem = source.name[: -len(".safetensors")] if source.suffix == ".safetensors" else source.name
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "lora"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def default_dtype(device: torch.device) -> torch.dtype:
    """The transformer and text encoder's dtype when none is given: bf16 on CUDA, else fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def apply_attention(
    components: WanComponents,
    attention: str | None,
    sparsity: float | None,
    tile_size: Sequence[int] | None,
    backend: str = "auto",
) -> None:
    """Set the loaded transformer's self-attention: ``attention`` (default the preset's),
    VSA ``sparsity`` (default the preset's when it runs VSA) and ``tile_size``."""
    p = components.preset
    mode = attention if attention is not None else p.attention
    if mode == "vsa" and sparsity is None and p.attention == "vsa":
        sparsity = p.sparsity
    tile_size = p.tile_size if tile_size is None else tile_size
    set_attention(
        components.transformer, mode, sparsity=sparsity, tile_size=tile_size, backend=backend
    )


def image_video_size(identity: ModelIdentity, image: Any) -> tuple[int, int]:
    """``(height, width)`` keeping ``image``'s aspect ratio with about the model's default
    pixel count, each a multiple of the VAE stride x patch (what diffusers' Wan
    image-to-video examples compute). Reads the image only: no weights needed."""
    from fastwan.models.image_encoder import load_image

    img = load_image(image)
    p = identity.preset
    multiple = p.vae_stride[1] * max(identity.patch_size[1:])
    return default_size_for_image((img.height, img.width), p.height * p.width, multiple)


def _device_of(module: torch.nn.Module) -> torch.device | None:
    param = next(module.parameters(), None)
    return param.device if param is not None else None


def _is_finite_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _postprocess(frames: np.ndarray, output_type: str) -> Any:
    """Decoded frames ``[B, F, H, W, 3]`` float32 in [0, 1] as diffusers'
    ``VideoProcessor.postprocess_video`` returns them for ``output_type``."""
    if output_type == "np":
        return frames
    if output_type == "pt":
        return torch.from_numpy(frames).permute(0, 1, 4, 2, 3).contiguous()  # [B, F, 3, H, W]
    from PIL import Image

    uint8 = (frames * 255).round().astype(np.uint8)
    return [[Image.fromarray(f) for f in video] for video in uint8]


@torch.no_grad()
def decode_latents(
    vae: torch.nn.Module, latents: torch.Tensor, *, device: str | torch.device | None = None
) -> np.ndarray:
    """Normalised Wan latents ``[B, C, T, h, w]`` -> frames ``[B, F, H, W, 3]`` float32 in
    [0, 1]: un-normalised with the VAE's ``latents_mean`` / ``latents_std``, then decoded on
    ``device`` (default: the VAE's)."""
    if device is None:
        device = next(vae.parameters()).device
    z = latents.to(device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    # Divide by 1/std (not multiply by std) to match diffusers' rounding exactly.
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # [B, 3, F, H, W]
    video = (video * 0.5 + 0.5).clamp(0, 1)
    return video.permute(0, 2, 3, 4, 1).float().cpu().numpy()  # [B, F, H, W, 3]


def _model_fn(
    transformer: torch.nn.Module,
    embeds: dict,
    key: str,
    expand: bool,
    shape: tuple,
    condition: ImageCondition | None,
):
    """``v = f(x, t)`` of the transformer on the text embeddings ``embeds[key]`` (read at
    each call: callback_on_step_end may replace them) and the image ``condition``."""
    dtype = transformer.dtype
    patch = tuple(transformer.config.patch_size)
    image_embeds = condition.image_embeds if condition is not None else None
    if image_embeds is not None:
        image_embeds = image_embeds.to(dtype)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if condition is not None:
            x, t = condition.model_inputs(x, t, patch)
        elif expand:  # Wan2.2 TI2V: the same timestep for every latent token
            t = per_token_timesteps(t, shape, patch)  # [B, S]
        extra = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}
        return transformer(
            hidden_states=x.to(dtype),
            timestep=t,
            encoder_hidden_states=embeds[key].to(x.device, dtype),
            return_dict=False,
            **extra,
        )[0]

    return model_fn


def denoise(
    transformer: torch.nn.Module,
    noise: torch.Tensor,
    cond: torch.Tensor,
    *,
    sampler: str,
    generator: torch.Generator,
    timesteps: Sequence[float] | None = None,
    num_inference_steps: int | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    flow_shift: float = 1.0,
    scheduler=None,
    expand_timesteps: bool = False,
    condition: ImageCondition | None = None,
    callback: Callback | None = None,
    embeds: dict | None = None,
    guidance: Callable | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Run a Wan transformer's sampler from ``noise`` ``[B, C, T, h, w]`` (at t = 1000).

    cond / uncond: text embeddings ``[B, L, dim]`` (uncond with ``guidance_scale`` > 1:
    CFG ``uncond + w (cond - uncond)``). sampler: ``"dmd"`` (few-step on ``timesteps``),
    ``"euler"`` (``num_inference_steps`` shifted by ``flow_shift``), ``"scheduler"`` (a
    fresh copy of the diffusers ``scheduler``) or ``"unipc"`` (UniPC from its config).
    expand_timesteps: Wan2.2 TI2V per-token timesteps. condition: the image of an
    image-to-video model (:class:`ImageCondition`). embeds: a dict holding
    ``prompt_embeds`` / ``negative_prompt_embeds`` that a ``callback`` may replace between
    steps (default: ``cond`` / ``uncond``). guidance: ``(cond_fn, uncond_fn, scale) ->
    model_fn`` in place of :func:`~fastwan.diffusion.samplers.cfg` (CFG parallel). Call
    under ``torch.no_grad()``.
    Returns (latents ``[B, C, T, h, w]`` float32, the timesteps the model saw).
    """
    check_choice(sampler, SAMPLERS, "sampler")
    shape = tuple(noise.shape)
    if embeds is None:
        embeds = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    model_fn = _model_fn(transformer, embeds, "prompt_embeds", expand_timesteps, shape, condition)
    if embeds.get("negative_prompt_embeds") is not None and guidance_scale != 1.0:
        uncond_fn = _model_fn(
            transformer, embeds, "negative_prompt_embeds", expand_timesteps, shape, condition
        )
        model_fn = (guidance or cfg)(model_fn, uncond_fn, guidance_scale)
    seen: list[float] = []

    def traced(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # one call per step
        seen.append(float(t.reshape(-1)[0]))
        return model_fn(x, t)

    if sampler == "dmd":
        if timesteps is None:
            raise ValueError("the dmd sampler needs timesteps= (e.g. [1000, 757, 522])")
        latents = sample_dmd(traced, noise, timesteps, generator, callback=callback)
    elif sampler == "euler":
        latents = sample_euler(
            traced,
            noise,
            flow_timesteps(num_inference_steps, flow_shift),
            generator,
            callback=callback,
        )
    else:
        if scheduler is None:
            raise ValueError(f"sampler {sampler!r} needs scheduler= (the pipeline's scheduler)")
        if sampler == "unipc":
            from diffusers import UniPCMultistepScheduler

            scheduler = UniPCMultistepScheduler.from_config(
                scheduler.config, prediction_type="flow_prediction", use_flow_sigmas=True
            )
        scheduler = with_flow_shift(scheduler, flow_shift)  # a fresh, stateless copy
        latents = sample_scheduler(
            traced, noise, num_inference_steps, generator, scheduler=scheduler, callback=callback
        )
    if condition is not None:
        latents = condition.finalize(latents)
    return latents, seen
