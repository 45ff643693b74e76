"""VideoGenerator: a prompt in, a video out, for Wan and FastWan checkpoints.

text encoder (UMT5) -> sampler (3-step DMD with VSA for FastWan; many-step UniPC with CFG
and dense attention for Wan) -> VAE decode. The components are diffusers' and transformers'
own classes; the math mirrors diffusers' ``WanPipeline``, so with dense attention and the
same scheduler, seed and timesteps both produce the same video.
"""

from __future__ import annotations

import html
import math
import numbers
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

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
from fastwan.models.vsa import get_attention, set_attention

SAMPLER_NAMES = ("dmd", "euler", "unipc", "scheduler")
OUTPUT_TYPES = ("np", "latent")
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; CLI seeds add one per prompt
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16`` or a name: fp32 / bf16 / fp16 (or float32 / bfloat16 / float16)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


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
class GenerationOutput:
    """Result of :meth:`VideoGenerator.generate`."""

    frames: np.ndarray | None  # [B, F, H, W, 3] float32 in [0, 1]; None for output_type="latent"
    latents: torch.Tensor  # [B, C, T, h, w] float32 on the CPU: the denoised latents
    timings: dict[str, float]  # seconds: text_encode, denoise, decode, total
    prompts: list[str]
    seed: int | None
    fps: int
    sampler: str
    timesteps: list[float] = field(default_factory=list)  # the timesteps the model saw
    # sampling setting -> where its value came from ("argument", "scheduler_config.json", ...)
    sampling_sources: dict[str, str] = field(default_factory=dict)

    @property
    def video(self) -> np.ndarray:
        """The first video, ``[F, H, W, 3]``."""
        if self.frames is None:
            raise ValueError("no frames: generate(..., output_type='np') decodes them")
        return self.frames[0]


class VideoGenerator:
    """Text-to-video with a Wan / FastWan Diffusers checkpoint.

    >>> gen = VideoGenerator.from_pretrained("FastVideo/FastWan2.1-T2V-1.3B-Diffusers")
    >>> out = gen.generate("a red fox running through snow", seed=0)
    >>> save_video(out.video, "fox.mp4", fps=out.fps)
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
            for module in (components.text_encoder, components.transformer, components.vae):
                module.to(self.device)
        if self.compile_backend is not None:
            compile_blocks(components.transformer, backend=self.compile_backend)
        self.vae_tiling = vae_tiling
        if vae_tiling:  # decode in overlapping spatial tiles: bounded memory at any size
            components.vae.enable_tiling()

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
        """
        dev = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        components = load_components(
            path_or_id,
            preset=preset,
            dtype=parse_dtype(dtype),
            vae_dtype=parse_dtype(vae_dtype),
            strict=strict,
        )
        p = components.preset
        mode = attention if attention is not None else p.attention
        if mode == "vsa" and sparsity is None and p.attention == "vsa":
            sparsity = p.sparsity
        tile_size = p.tile_size if tile_size is None else tile_size
        set_attention(
            components.transformer, mode, sparsity=sparsity, tile_size=tile_size, backend=backend
        )
        return cls(
            components,
            device=dev,
            cpu_offload=cpu_offload,
            compile=compile,
            vae_tiling=vae_tiling,
        )

    @property
    def preset(self) -> WanPreset:
        """The effective sampling defaults of the loaded model."""
        return self.components.preset

    @property
    def identity(self) -> ModelIdentity:
        return self.components.identity

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

    # ----------------------------------------------------------------- geometry
    @property
    def vae_scale(self) -> tuple[int, int]:
        """(temporal, spatial) downsampling of the VAE."""
        cfg_ = self.components.vae.config
        return int(cfg_.scale_factor_temporal), int(cfg_.scale_factor_spatial)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple:
        """``[B, C, T, h, w]`` for a video, or a ValueError naming the nearest valid sizes
        (or the model's largest, past its rotary position table)."""
        check_video_size(self.identity, height, width, num_frames)
        st, ss = self.vae_scale
        channels = self.transformer.config.in_channels
        return (batch, channels, (num_frames - 1) // st + 1, height // ss, width // ss)

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
        if max_sequence_length is None:
            max_sequence_length = self.preset.text_length
        tok = self.components.tokenizer
        inputs = tok(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids, inputs.attention_mask  # [B, L]
        lengths = mask.gt(0).sum(dim=1)  # [B]
        full = tok([clean_prompt(p) for p in prompts], add_special_tokens=True).input_ids
        cut = [(i, len(f) - max_sequence_length) for i, f in enumerate(full)]
        cut = [(i, n) for i, n in cut if n > 0]
        if cut:
            warnings.warn(
                f"{len(cut)} prompt(s) are longer than the model's {max_sequence_length} text "
                f"tokens; their last tokens are dropped (prompt {cut[0][0]}: {cut[0][1]} "
                "tokens): shorten the prompt, or pass a larger max_sequence_length",
                stacklevel=3,
            )
        with self._on_device(self.components.text_encoder) as encoder:
            hidden = encoder(ids.to(self.device), mask.to(self.device)).last_hidden_state
        keep = (
            torch.arange(hidden.shape[1], device=hidden.device)[None, :]
            < lengths.to(hidden.device)[:, None]
        )  # [B, L]
        return hidden * keep[..., None].to(hidden.dtype)  # [B, L, text_dim]

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
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {sampler!r}")
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
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        flow_shift: float | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "np",
        callback: Callback | None = None,
    ) -> GenerationOutput:
        """Generate one video per prompt.

        Sizes default to the preset's. ``timesteps`` -> few-step DMD; ``num_inference_steps``
        -> multi-step (``sampler``: ``"scheduler"``, the checkpoint's diffusers scheduler,
        UniPC for Wan; ``"unipc"``; or ``"euler"``); neither -> the preset's way.
        ``guidance_scale`` > 1 runs CFG with ``negative_prompt`` (default: the preset's).
        Randomness comes from ``generator``, else a CPU generator seeded with ``seed``.
        """
        t_start = time.perf_counter()
        p = self.preset
        prompts = [prompt] if isinstance(prompt, str) else prompt
        plan = self.check_inputs(
            prompts,
            negative_prompt,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            guidance_scale=guidance_scale,
            seed=seed,
            generator=generator,
            sampler=sampler,
            flow_shift=flow_shift,
            max_sequence_length=max_sequence_length,
            output_type=output_type,
        )
        prompts = list(prompts)
        shape, name, ts, steps = plan["shape"], plan["sampler"], plan["timesteps"], plan["steps"]
        scale, shift = plan["guidance_scale"], plan["flow_shift"]
        max_sequence_length = plan["max_sequence_length"]
        own_generator = generator is not None
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))

        timings = {}
        t0 = time.perf_counter()
        cond = self.encode_prompt(prompts, max_sequence_length)
        uncond = None
        if scale > 1.0:
            neg = p.negative_prompt if negative_prompt is None else negative_prompt
            negs = [neg] * len(prompts) if isinstance(neg, str) else list(neg)  # checked
            uncond = self.encode_prompt(negs, max_sequence_length)
        self._sync()
        timings["text_encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        noise = torch.randn(
            shape, generator=generator, device=generator.device, dtype=torch.float32
        )
        noise = noise.to(self.device)  # [B, C, T, h, w]
        with torch.no_grad(), self._on_device(self.transformer):
            latents, seen = denoise(
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
                callback=callback,
            )
        self._sync()
        timings["denoise"] = time.perf_counter() - t0

        frames = None
        t0 = time.perf_counter()
        if output_type == "np":
            frames = self.decode(latents)
        self._sync()
        timings["decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        return GenerationOutput(
            frames=frames,
            latents=latents.float().cpu(),
            timings=timings,
            prompts=prompts,
            seed=None if own_generator or seed is None else int(seed),
            fps=p.fps,
            sampler=name,
            timesteps=seen,
            sampling_sources=plan["sources"],
        )

    def check_inputs(
        self,
        prompt,
        negative_prompt=None,
        *,
        height=None,
        width=None,
        num_frames=None,
        num_inference_steps=None,
        timesteps=None,
        guidance_scale=None,
        seed=0,
        generator=None,
        sampler=None,
        flow_shift=None,
        max_sequence_length=None,
        output_type="np",
    ) -> dict:
        """Check every argument of :meth:`generate` before any work (a ValueError naming the
        argument and the fix) and resolve the defaults; returns the plan: latent
        ``shape``, ``sampler``, ``timesteps`` / ``steps``, ``guidance_scale``,
        ``flow_shift``, ``max_sequence_length`` and each setting's ``sources``."""
        p = self.preset
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(prompts, (list, tuple))
            or not prompts
            or not all(isinstance(x, str) and x.strip() for x in prompts)
        ):
            raise ValueError("prompt must be a non-empty string or a list of them")
        if negative_prompt is not None:
            negs = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negs, (list, tuple)) or not all(isinstance(x, str) for x in negs):
                raise ValueError("negative_prompt must be a string or a list of strings")
            if len(negs) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negs)} entries for {len(prompts)} prompts; pass "
                    "one string or one per prompt"
                )
        given_length = max_sequence_length
        if max_sequence_length is None:
            max_sequence_length = p.text_length
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int):
            raise ValueError(f"max_sequence_length must be an int, got {max_sequence_length!r}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        given = dict(
            height=height,
            width=width,
            num_frames=num_frames,
            guidance_scale=guidance_scale,
            flow_shift=flow_shift,
            negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length,
        )
        height = p.height if height is None else height
        width = p.width if width is None else width
        num_frames = p.num_frames if num_frames is None else num_frames
        shape = self.latent_shape(len(prompts), height, width, num_frames)
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
        sources = {k: self.identity.sources.get(k, "default") for k in given}
        sources.update({k: "argument" for k, v in given.items() if v is not None})
        if given_length is None:
            sources["max_sequence_length"] = self.identity.sources.get("text_length", "default")
        if name == "dmd":
            sources["timesteps"] = (
                "argument" if timesteps is not None else self.identity.sources["timesteps"]
            )
        else:
            sources["num_inference_steps"] = (
                "argument"
                if num_inference_steps is not None
                else self.identity.sources.get("num_inference_steps", "default")
            )
        sources["sampler"] = "argument" if sampler is not None else "timesteps / steps"
        return dict(
            shape=shape,
            sampler=name,
            timesteps=ts,
            steps=steps,
            guidance_scale=float(scale),
            flow_shift=float(shift),
            max_sequence_length=max_sequence_length,
            sources=sources,
        )


def _is_finite_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


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


def _model_fn(transformer: torch.nn.Module, cond: torch.Tensor, expand: bool, shape: tuple):
    dtype = transformer.dtype
    patch = transformer.config.patch_size

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if expand:  # Wan2.2 TI2V: the same timestep for every latent token
            t = per_token_timesteps(t, shape, patch)  # [B, S]
        return transformer(
            hidden_states=x.to(dtype),
            timestep=t,
            encoder_hidden_states=cond,
            return_dict=False,
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
    callback: Callback | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Run a Wan transformer's sampler from ``noise`` ``[B, C, T, h, w]`` (at t = 1000).

    cond / uncond: text embeddings ``[B, L, dim]`` (uncond with ``guidance_scale`` > 1:
    CFG ``uncond + w (cond - uncond)``). sampler: ``"dmd"`` (few-step on ``timesteps``),
    ``"euler"`` (``num_inference_steps`` shifted by ``flow_shift``), ``"scheduler"`` (a
    fresh copy of the diffusers ``scheduler``) or ``"unipc"`` (UniPC from its config).
    expand_timesteps: Wan2.2 TI2V per-token timesteps. Call under ``torch.no_grad()``.
    Returns (latents ``[B, C, T, h, w]`` float32, the timesteps the model saw).
    """
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {sampler!r}")
    device = noise.device
    tdtype = transformer.dtype
    shape = tuple(noise.shape)
    model_fn = _model_fn(transformer, cond.to(device, tdtype), expand_timesteps, shape)
    if uncond is not None and guidance_scale != 1.0:
        uncond_fn = _model_fn(transformer, uncond.to(device, tdtype), expand_timesteps, shape)
        model_fn = cfg(model_fn, uncond_fn, guidance_scale)
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
    return latents, seen


def _grid_tokens(shape: tuple, patch_size) -> int:
    _, _, T, h, w = shape
    p_t, p_h, p_w = patch_size
    return (T // p_t) * (h // p_h) * (w // p_w)


def per_token_timesteps(t: torch.Tensor, latent_shape: Sequence[int], patch_size) -> torch.Tensor:
    """Wan2.2 TI2V (diffusers' ``expand_timesteps``): the timesteps ``t`` ``[B]`` repeated
    for every latent token, ``[B, S]`` float32 with ``S = (T/p_t)(h/p_h)(w/p_w)`` tokens of
    latents ``[B, C, T, h, w]`` (text-to-video: every token shares its sample's timestep,
    as diffusers' WanPipeline passes them)."""
    if t.dim() != 1 or t.shape[0] != latent_shape[0]:
        raise ValueError(f"timesteps must be [B] with B = {latent_shape[0]}, got {tuple(t.shape)}")
    tokens = _grid_tokens(tuple(latent_shape), patch_size)
    return t.to(torch.float32)[:, None].expand(-1, tokens)  # [B, S]
