"""Typed training configuration: dataclasses that validate themselves, YAML recipes.

A :class:`Recipe` has one section per concern; YAML recipes in ``recipes/`` fill it::

    model:    teacher / student / critic weights (Diffusers folders or Hub ids), dtypes
    train:    method (dmd | flow), steps, batch sizes, seed, precision, EMA, intervals
    parallel: world size and the device mesh (replicate x shard x sequence_parallel)
    data:     dataset path, text-only, CFG dropout, workers, clip size
    optim:    generator and critic optimisers (lr, betas, decay, clipping, LR schedule)
    dmd:      few-step timesteps, critic/generator ratio, timestep range, CFG, rollout
    vsa:      Video Sparse Attention: sparsity, tile, backend, sparsity schedule
    lora:     LoRA adapters instead of whole trainable networks (rank 0: off)

Every dataclass checks itself in ``__post_init__`` and raises :class:`ConfigError` (a
``ValueError``) whose message starts with the dotted field (``optim.generator.lr``) and
says how to fix it. :class:`Recipe` adds the checks that span sections (global batch =
micro batch x accumulation x data-parallel size, ...).

``load_recipe(path, overrides)`` reads YAML and applies dotted overrides such as
``--optim.generator.lr=2e-5`` or ``train.max_steps=10``. Decoding, type checks and dumping
are pydantic's (v2, strict JSON mode, on these stdlib dataclasses): YAML values must have
the field's type already (a quoted ``max_steps: "600"`` is refused naming the field; ints
are accepted as floats; lists become the annotated tuples; unknown keys are refused with a
did-you-mean). An override's value is YAML, as it would be written after ``key:`` in the
recipe (``2e-5``, ``[2, 4, 4]``, ``null``, ``false``), except that text fields take it
verbatim; ``1e-5`` without a dot is read as a float, as YAML 1.2 does. ``dump_recipe``
writes a recipe back to YAML; loading the dump gives an equal recipe. The field
docstrings are the help text of ``fastwan distill --help`` (:func:`recipe_options`).

Resuming with a changed recipe: :func:`resume_changes` compares a checkpoint's saved recipe
with the new one field by field; the fields of :data:`RESUME_SAFE_FIELDS` may change
(they are applied and recorded by the trainer), any other change is refused naming each
field, old -> new, and the fix.

Guidance convention: ``dmd.guidance_scale`` is the *standard* CFG scale ``w`` in
``uncond + w (cond - uncond)`` (1 = no guidance). FastVideo's ``real_score_guidance_scale``
``w'`` means ``cond + w' (cond - uncond)``, i.e. ``w = w' + 1``: the published FastWan
recipes' 3.5 is 4.5 here (see :func:`fastwan.methods.losses.fastvideo_to_standard_guidance`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BeforeValidator, TypeAdapter, ValidationError

from fastwan.choices import (
    ATTENTION_BACKENDS,
    CHECKPOINT_MODES,
    COMPILE_BACKENDS,
    LORA_GATES,
    LORA_INITS,
    METHODS,
    TRAIN_DTYPES,
    VALIDATION_SAMPLERS,
    parse_dtype,
)

__all__ = [
    "ConfigError",
    "DMDConfig",
    "check_override_key",
    "DataConfig",
    "LoRAConfig",
    "ModelConfig",
    "OptimConfig",
    "OptimConfigs",
    "ParallelConfig",
    "Recipe",
    "RecipeOption",
    "TRACKERS",
    "TrainConfig",
    "VSAConfig",
    "WAN_NEGATIVE_PROMPT",
    "dump_recipe",
    "load_recipe",
    "parse_overrides",
    "RESUME_SAFE_FIELDS",
    "load_recipe_dict",
    "recipe_changes",
    "recipe_from_dict",
    "recipe_fields",
    "recipe_options",
    "recipe_to_dict",
    "resume_changes",
    "torch_dtype",
]

# Mirrors fastwan.models.presets.WAN_NEGATIVE_PROMPT (not imported: that package pulls in
# torch); a test keeps the two equal.
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, "
    "ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, "
    "disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)

# Where training metrics go besides the console (train.report_to).
TRACKERS = ("tensorboard", "wandb")

# pydantic's settings for every config dataclass: unknown keys are errors; the attribute
# docstrings are the fields' descriptions (the CLI's help).
_PYDANTIC_CONFIG = {"extra": "forbid", "use_attribute_docstrings": True}

_T = TypeVar("_T")


def _one_item_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# A list field that also takes one string for a one-item list (report_to: tensorboard).
_OneOrList = Annotated[list[_T], BeforeValidator(_one_item_list)]


class ConfigError(ValueError):
    """A bad configuration value; ``str()`` is ``"<dotted.field>: <what is wrong and the fix>"``."""

    def __init__(self, field_name: str, message: str, where: str = ""):
        self.field_name = field_name
        self.message = message
        self.where = where
        super().__init__(f"{self.path}: {message}")

    @property
    def path(self) -> str:
        return f"{self.where}.{self.field_name}" if self.where else self.field_name

    def at(self, section: str) -> ConfigError:
        """The same error with ``where`` replaced by the dotted section path."""
        return ConfigError(self.field_name, self.message, section)


def _fail(obj: Any, name: str, message: str) -> typing.NoReturn:
    raise ConfigError(name, message, type(obj).__name__)


def _check_range(
    obj: Any,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    fix: str = "",
) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(obj, name, f"must be a finite number, got {value!r}")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        if hi is None:
            want = f"{'>' if lo_open else '>='} {lo:g}"
        elif lo is None:
            want = f"{'<' if hi_open else '<='} {hi:g}"
        else:
            want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        _fail(obj, name, f"must be {want}, got {value!r}{fix}")


def _check_int(obj: Any, name: str, minimum: int, fix: str = "") -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(obj, name, f"must be an integer, got {value!r}")
    if value < minimum:
        _fail(obj, name, f"must be >= {minimum}, got {value}{fix}")


def _check_choice(obj: Any, name: str, choices: Sequence[str]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        _fail(obj, name, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_path(obj: Any, name: str, optional: bool, fix: str) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        _fail(obj, name, f"must be a non-empty path or id, got {value!r}; {fix}")


def torch_dtype(name: str) -> Any:
    """``"fp32"`` / ``"bf16"`` -> ``torch.float32`` / ``torch.bfloat16`` (imports torch lazily)."""
    return parse_dtype(name, TRAIN_DTYPES)


# ------------------------------------------------------------------------------ sections


@dataclass
class ModelConfig:
    """Which weights to load. Paths are Diffusers folders or Hugging Face Hub ids.

    The FastWan recipes start teacher, generator and critic from the same weights.
    """

    __pydantic_config__ = _PYDANTIC_CONFIG

    teacher: str
    """The frozen teacher ("real score" network): a Diffusers folder or Hub id."""
    student: str | None = None
    """Weights the generator (student) starts from; null: the teacher's."""
    critic: str | None = None
    """Weights the critic ("fake score") starts from; null: the teacher's."""
    dtype: Literal[TRAIN_DTYPES] = "fp32"
    """Dtype of the trainable networks' master weights (optimizer states follow them)."""
    teacher_dtype: Literal[TRAIN_DTYPES] = "bf16"
    """Dtype the frozen teacher is stored in (it has no optimizer state)."""

    def __post_init__(self) -> None:
        fix = "give a Diffusers folder or Hub id such as 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'"
        _check_path(self, "teacher", optional=False, fix=fix)
        _check_path(self, "student", optional=True, fix=fix + " (or null: the teacher)")
        _check_path(self, "critic", optional=True, fix=fix + " (or null: the teacher)")
        _check_choice(self, "dtype", TRAIN_DTYPES)
        _check_choice(self, "teacher_dtype", TRAIN_DTYPES)

    @property
    def student_path(self) -> str:
        return self.student if self.student is not None else self.teacher

    @property
    def critic_path(self) -> str:
        return self.critic if self.critic is not None else self.teacher


@dataclass
class VSAConfig:
    """Video Sparse Attention in the generator's self-attention.

    The sparsity schedule (used by ``flow`` fine-tuning, where a dense model learns to
    attend sparsely) ramps from 0 to ``sparsity``:
    ``min(sparsity, decay_rate * (step // decay_interval))``.
    """

    __pydantic_config__ = _PYDANTIC_CONFIG

    enabled: bool = True
    """Sparse attention in the generator (false: dense attention)."""
    sparsity: float = 0.9
    """Fraction of key/value tiles each query tile skips:
    k = clamp(ceil((1 - sparsity) * num_kv_tiles), 1, num_kv_tiles)."""
    tile_size: tuple[int, int, int] = (4, 4, 4)
    """Tile of the token grid [t, h, w] (VSA uses [4, 4, 4])."""
    backend: Literal[ATTENTION_BACKENDS] = "auto"
    """VSA kernel: auto = Triton on CUDA, else torch; reference = the dense float32
    oracle."""
    decay_rate: float = 0.0
    """Sparsity added every decay_interval steps, up to sparsity; 0: no ramp (sparsity
    from step 0, as in sparse distillation)."""
    decay_interval: int = 1
    """Steps between the ramp's increases (see decay_rate)."""

    def __post_init__(self) -> None:
        _check_range(
            self, "sparsity", 0.0, 1.0, hi_open=True, fix=" (0 keeps every tile; 0.9 skips 90%)"
        )
        if isinstance(self.tile_size, list):  # accept a list from Python callers
            self.tile_size = tuple(self.tile_size)  # type: ignore[assignment]
        ts = self.tile_size
        if (
            not isinstance(ts, tuple)
            or len(ts) != 3
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ts)
        ):
            _fail(
                self,
                "tile_size",
                f"must be three positive ints [t, h, w], got {ts!r}; VSA uses [4, 4, 4]",
            )
        _check_choice(self, "backend", ATTENTION_BACKENDS)
        _check_range(self, "decay_rate", 0.0, 1.0, fix=" (0 disables the ramp)")
        _check_int(self, "decay_interval", 1)


@dataclass
class DMDConfig:
    """Distribution Matching Distillation (DMD2) settings."""

    __pydantic_config__ = _PYDANTIC_CONFIG

    denoising_timesteps: list[int] = field(default_factory=lambda: [1000, 757, 522])
    """The student's few-step schedule: timesteps in (0, 1000], strictly decreasing;
    inference uses the same steps."""
    generator_update_interval: int = 5
    """The generator is updated once every this many steps, the critic every step
    (DMD2's two-time-scale update rule)."""
    min_timestep_ratio: float = 0.02
    """Lower clamp of the noise level s (x 1000) at which teacher and critic are
    queried."""
    max_timestep_ratio: float = 0.98
    """Upper clamp of that noise level."""
    guidance_scale: float = 4.5
    """The teacher's CFG scale w in the standard convention uncond + w (cond - uncond)
    (1 = none); FastVideo's real_score_guidance_scale 3.5 is 4.5 here (w = w' + 1)."""
    rollout: Literal["data", "simulate"] = "data"
    """The student's input at a step. data: a dataset latent noised to one of
    denoising_timesteps; simulate: the student's own few-step sampler from pure noise
    down to that timestep (data-free distillation from text embeddings)."""
    flow_shift: float = 3.0
    """Timestep shift of the scheduler (Wan: 8 for 1.3B, 3 for 14B, 5 for 5B); also
    shifts the sampled training noise levels."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """The teacher's CFG uncond text (encoded once at start; also the negative of flow
    validation with CFG); default Wan's, "" for none."""
    gan_generator_weight: float = 0.0
    """DMD2's GAN term (Sec. 4.3): its weight in the generator's loss (0: off; DMD2 used
    3e-3 to 5e-3). A classifier head on the critic's features tells noised real latents
    from noised student samples; needs real latents (data.text_only: false)."""
    gan_critic_weight: float = 0.0
    """The GAN term's weight in the critic's loss (DMD2: 1e-2); > 0 exactly when
    gan_generator_weight is."""
    gan_max_timestep_ratio: float | None = None
    """Upper clamp of the GAN term's own noise levels (x 1000; null: the GAN reads the
    critic calls of the DMD and flow-matching losses, at their levels). Lower values show
    the classifier fine detail that high noise hides, at one more critic call per step."""
    gan_feature_block: int | None = None
    """The critic block whose output feeds the GAN head (0-based; null: the middle
    block, DMD2's bottleneck)."""

    def __post_init__(self) -> None:
        steps = self.denoising_timesteps
        if (
            not isinstance(steps, list)
            or not steps
            or any(isinstance(t, bool) or not isinstance(t, int) for t in steps)
        ):
            _fail(self, "denoising_timesteps", f"must be a non-empty list of ints, got {steps!r}")
        if any(not 0 < t <= 1000 for t in steps):
            _fail(
                self, "denoising_timesteps", f"every timestep must be in (0, 1000], got {steps!r}"
            )
        if any(a <= b for a, b in zip(steps, steps[1:])):
            _fail(
                self,
                "denoising_timesteps",
                f"must be strictly decreasing (noisiest first), got {steps!r}; "
                "e.g. [1000, 757, 522]",
            )
        _check_int(self, "generator_update_interval", 1, fix=" (5 in DMD2 / FastWan)")
        _check_range(self, "min_timestep_ratio", 0.0, 1.0)
        _check_range(self, "max_timestep_ratio", 0.0, 1.0)
        if self.min_timestep_ratio >= self.max_timestep_ratio:
            _fail(
                self,
                "min_timestep_ratio",
                f"must be < max_timestep_ratio ({self.max_timestep_ratio}), got "
                f"{self.min_timestep_ratio}; the defaults are 0.02 and 0.98",
            )
        _check_range(
            self,
            "guidance_scale",
            0.0,
            None,
            fix=" (standard CFG: 1 = no guidance; FastVideo's w' is w - 1)",
        )
        _check_choice(self, "rollout", ("data", "simulate"))
        _check_range(self, "flow_shift", 0.0, None, lo_open=True, fix=" (1 = no shift)")
        if not isinstance(self.negative_prompt, str):
            _fail(
                self,
                "negative_prompt",
                f'must be a string, got {self.negative_prompt!r}; use "" for no negative prompt',
            )
        _check_range(self, "gan_generator_weight", 0.0, None, fix=" (0: no GAN term)")
        _check_range(self, "gan_critic_weight", 0.0, None, fix=" (0: no GAN term)")
        if (self.gan_generator_weight > 0) != (self.gan_critic_weight > 0):
            on, off = (
                ("gan_generator_weight", "gan_critic_weight")
                if self.gan_generator_weight > 0
                else ("gan_critic_weight", "gan_generator_weight")
            )
            _fail(
                self,
                off,
                f"is 0 but {on} is {getattr(self, on)}: the GAN term needs both (the critic "
                "trains the classifier the generator is scored by); set both > 0 (DMD2: "
                "gan_generator_weight 5e-3, gan_critic_weight 1e-2) or both 0",
            )
        if self.gan_max_timestep_ratio is not None:
            _check_range(self, "gan_max_timestep_ratio", 0.0, 1.0)
            if self.gan_max_timestep_ratio <= self.min_timestep_ratio:
                _fail(
                    self,
                    "gan_max_timestep_ratio",
                    f"must be > min_timestep_ratio ({self.min_timestep_ratio}), got "
                    f"{self.gan_max_timestep_ratio}; e.g. 0.3, or null",
                )
        if self.gan_feature_block is not None:
            _check_int(self, "gan_feature_block", 0, fix=" (null: the middle block)")

    @property
    def gan(self) -> bool:
        """Whether DMD2's GAN term is on."""
        return self.gan_generator_weight > 0


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule, for one network."""

    __pydantic_config__ = _PYDANTIC_CONFIG

    lr: float = 1e-5
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas [beta1, beta2] (DMD2's generator: [0.0, 0.999])."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW (decoupled) weight decay."""
    grad_clip: float | None = 1.0
    """Max global gradient norm; null: no clipping."""
    schedule: Literal["constant", "warmup", "cosine"] = "constant"
    """LR schedule. constant; warmup: linear warmup over warmup_steps, then constant;
    cosine: linear warmup, then cosine decay to min_lr_ratio x lr at the last step."""
    warmup_steps: int = 0
    """Steps of linear LR warmup (warmup and cosine schedules)."""
    min_lr_ratio: float = 0.0
    """The cosine schedule's final LR as a fraction of lr."""

    def __post_init__(self) -> None:
        _check_range(self, "lr", 0.0, None, lo_open=True, fix=" (e.g. 1e-5)")
        if isinstance(self.betas, list):  # accept a list from Python callers
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        b = self.betas
        if (
            not isinstance(b, tuple)
            or len(b) != 2
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in b)
            or any(not 0.0 <= x < 1.0 for x in b)
        ):
            _fail(self, "betas", f"must be two numbers in [0, 1), got {b!r}; e.g. [0.9, 0.999]")
        _check_range(self, "eps", 0.0, None, lo_open=True)
        _check_range(self, "weight_decay", 0.0, None)
        if self.grad_clip is not None:
            _check_range(
                self, "grad_clip", 0.0, None, lo_open=True, fix=" (use null to disable clipping)"
            )
        _check_choice(self, "schedule", ("constant", "warmup", "cosine"))
        _check_int(self, "warmup_steps", 0)
        if self.schedule == "warmup" and self.warmup_steps == 0:
            _fail(
                self,
                "warmup_steps",
                "is 0 with schedule 'warmup'; set warmup_steps > 0 or schedule: constant",
            )
        _check_range(self, "min_lr_ratio", 0.0, 1.0)
        if self.min_lr_ratio != 0.0 and self.schedule != "cosine":
            _fail(
                self,
                "min_lr_ratio",
                f"only applies to schedule 'cosine' (schedule is {self.schedule!r}); "
                "set schedule: cosine or min_lr_ratio: 0",
            )


@dataclass
class OptimConfigs:
    """One optimiser per trainable network; ``critic`` is unused by ``flow``."""

    __pydantic_config__ = _PYDANTIC_CONFIG

    generator: OptimConfig = field(default_factory=OptimConfig)
    """The generator's (student's) optimiser."""
    critic: OptimConfig = field(default_factory=OptimConfig)
    """The critic's ("fake score") optimiser; unused by flow."""

    def __post_init__(self) -> None:
        for name in ("generator", "critic"):
            if not isinstance(getattr(self, name), OptimConfig):
                _fail(self, name, f"must be an OptimConfig, got {type(getattr(self, name))}")


@dataclass
class TrainConfig:
    """The training loop.

    One *step* is one optimizer update of the trained network(s): for ``dmd`` one critic
    update, plus a generator update every ``dmd.generator_update_interval`` steps; it
    consumes ``global_batch_size`` samples, each data-parallel rank running
    ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size``.

    Validation (:mod:`fastwan.train.validation`): when ``validation_prompts`` is not empty,
    every ``validation_interval`` steps and at the end of training the student (its EMA when
    ``ema_decay`` is set) generates one video per prompt and seed at the ``data`` clip
    size: ``dmd`` with its few-step sampler on ``dmd.denoising_timesteps``; ``flow`` with
    ``validation_sampler`` on ``dmd.negative_prompt``. Videos and a grid image go to
    ``<output_dir>/validation/step-<N>/``.
    """

    __pydantic_config__ = _PYDANTIC_CONFIG

    method: Literal[METHODS] = "dmd"
    """dmd: DMD2 distillation (`fastwan distill`); flow: flow-matching fine-tuning
    (`fastwan finetune`)."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    global_batch_size: int = 1
    """Samples per step: micro_batch_size x gradient_accumulation_steps x data-parallel
    size."""
    micro_batch_size: int = 1
    """Samples per forward pass on one rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per step on one rank."""
    seed: int = 1000
    """Seed of noise, timesteps, data order and crops (the same on resume)."""
    mixed_precision: Literal[TRAIN_DTYPES] = "bf16"
    """Autocast dtype of the forward passes (fp16 is not supported: no loss scaling)."""
    ema_decay: float | None = None
    """EMA of the generator's weights, e.g. 0.999; null disables it."""
    ema_start_step: int = 0
    """Before this step the EMA restarts at the live weights (tracks them exactly)."""
    log_interval: int = 10
    """Steps between console / tracker log lines."""
    validation_interval: int = 200
    """Steps between validation videos (0: only at the end)."""
    checkpoint_interval: int = 500
    """Steps between checkpoints (0: only at the end)."""
    checkpoints_total_limit: int | None = 3
    """Keep at most this many complete checkpoints (null: keep all)."""
    output_dir: str = "outputs/run"
    """Folder of checkpoints, logs, validation videos and the run's recipe.yaml."""
    validation_prompts: _OneOrList[str] = field(default_factory=list)
    """Prompts of the validation videos ([] disables validation)."""
    validation_seeds: list[int] = field(default_factory=lambda: [1000])
    """Seeds of the validation videos (one video per prompt and seed)."""
    validation_steps: int = 50
    """Sampler steps of flow validation."""
    validation_guidance_scale: float = 5.0
    """CFG scale of flow validation (standard convention, 1 = none)."""
    validation_sampler: Literal[VALIDATION_SAMPLERS] = "scheduler"
    """Sampler of flow validation: scheduler = the folder's own diffusers scheduler,
    unipc = UniPC multistep, euler = flow-matching Euler."""
    validation_fps: int = 16
    """Frame rate of the validation MP4 / GIF files."""
    validation_grid_frames: int = 4
    """Frames per video in the validation grid image (prompts x seeds)."""
    report_to: _OneOrList[str] = field(default_factory=lambda: ["tensorboard"])
    """Metric sinks besides the console: tensorboard (event files under
    <output_dir>/logs) and/or wandb (project tracker_project); [] for none."""
    tracker_project: str = "fastwan"
    """The wandb project."""

    def __post_init__(self) -> None:
        _check_choice(self, "method", METHODS)
        _check_int(self, "max_steps", 1)
        _check_int(self, "global_batch_size", 1)
        _check_int(self, "micro_batch_size", 1)
        _check_int(self, "gradient_accumulation_steps", 1)
        _check_int(self, "seed", 0)
        _check_choice(self, "mixed_precision", TRAIN_DTYPES)
        if self.ema_decay is not None:
            _check_range(
                self,
                "ema_decay",
                0.0,
                1.0,
                lo_open=True,
                hi_open=True,
                fix=" (e.g. 0.999; null disables EMA)",
            )
        _check_int(self, "ema_start_step", 0)
        _check_int(self, "log_interval", 1)
        _check_int(
            self,
            "validation_interval",
            0,
            fix=" (0: validate only at the end; validation_prompts: [] disables validation)",
        )
        _check_int(self, "checkpoint_interval", 0, fix=" (0 disables periodic checkpoints)")
        if self.checkpoints_total_limit is not None:
            _check_int(self, "checkpoints_total_limit", 1, fix=" (null keeps all)")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            _fail(self, "output_dir", f"must be a non-empty path, got {self.output_dir!r}")
        prompts = self.validation_prompts
        if not isinstance(prompts, list) or any(
            not isinstance(p, str) or not p.strip() for p in prompts
        ):
            _fail(
                self,
                "validation_prompts",
                f"must be a list of non-empty strings, got {prompts!r}; [] disables validation",
            )
        seeds = self.validation_seeds
        if (
            not isinstance(seeds, list)
            or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        ):
            _fail(
                self,
                "validation_seeds",
                f"must be a non-empty list of non-negative ints, got {seeds!r}",
            )
        _check_int(self, "validation_steps", 1, fix=" (the flow validation sampler's steps)")
        _check_range(
            self,
            "validation_guidance_scale",
            0.0,
            None,
            lo_open=True,
            fix=" (standard CFG: 1 = no guidance)",
        )
        _check_choice(self, "validation_sampler", VALIDATION_SAMPLERS)
        _check_int(self, "validation_fps", 1)
        _check_int(self, "validation_grid_frames", 1)
        report = self.report_to
        if not isinstance(report, list) or any(r not in TRACKERS for r in report):
            _fail(
                self,
                "report_to",
                f"must be a list of {', '.join(map(repr, TRACKERS))} (or [] for the console "
                f"only), got {report!r}",
            )
        if len(set(report)) != len(report):
            _fail(self, "report_to", f"lists a tracker twice: {report!r}")
        if not isinstance(self.tracker_project, str) or not self.tracker_project.strip():
            _fail(
                self, "tracker_project", f"must be a non-empty name, got {self.tracker_project!r}"
            )


@dataclass
class ParallelConfig:
    """Device mesh ``[replicate, shard, sequence_parallel]`` over ``world_size`` ranks.

    ``replicate x shard x sequence_parallel == world_size``; the data-parallel size --
    ranks that see different samples -- is ``replicate x shard``.
    """

    __pydantic_config__ = _PYDANTIC_CONFIG

    world_size: int = 1
    """Processes (GPUs) of the run: torchrun --nproc_per_node x nodes."""
    replicate: int = 1
    """Replicas of the sharded model (HSDP when > 1 and shard > 1)."""
    shard: int = 1
    """Ranks a model's parameters are sharded over (FSDP2)."""
    sequence_parallel: int = 1
    """Ranks that split one sample's tokens (Ulysses)."""
    activation_checkpointing: Literal[CHECKPOINT_MODES] = "none"
    """Per block: none keeps every activation; full keeps only the block's inputs and
    recomputes the rest in backward; selective is full but keeps the attention outputs."""
    cpu_offload: bool = False
    """FSDP2 CPUOffloadPolicy: sharded states in host memory (needs world_size > 1)."""
    compile: Literal[("none", *COMPILE_BACKENDS)] = "none"
    """torch.compile each block of every network with this backend (none: eager);
    after activation checkpointing and before FSDP2 (torchtitan's order)."""

    def __post_init__(self) -> None:
        for name in ("world_size", "replicate", "shard", "sequence_parallel"):
            _check_int(self, name, 1)
        _check_choice(self, "activation_checkpointing", CHECKPOINT_MODES)
        _check_choice(self, "compile", ("none", *COMPILE_BACKENDS))
        if not isinstance(self.cpu_offload, bool):
            _fail(self, "cpu_offload", f"must be true or false, got {self.cpu_offload!r}")
        if self.cpu_offload and self.world_size == 1:
            _fail(
                self,
                "cpu_offload",
                "offloads FSDP shards and needs world_size > 1; set cpu_offload: false for "
                "a one-process run",
            )
        product = self.replicate * self.shard * self.sequence_parallel
        if product != self.world_size:
            other = self.shard * self.sequence_parallel
            hint = (
                f"; set replicate: {self.world_size // other}"
                if self.world_size % other == 0
                else f"; shard x sequence_parallel ({other}) must divide world_size"
            )
            _fail(
                self,
                "replicate",
                f"replicate x shard x sequence_parallel = {self.replicate} x {self.shard} x "
                f"{self.sequence_parallel} = {product} must equal world_size "
                f"({self.world_size}){hint}",
            )

    @property
    def data_parallel_size(self) -> int:
        return self.replicate * self.shard


@dataclass
class DataConfig:
    """Training data (parquet shards written by ``fastwan preprocess``) and clip size.

    In data mode (latents read from the shards) the clip size is also the *training* size:
    latents with more latent frames than the recipe's (``(num_frames - 1) //`` the VAE's
    temporal stride ``+ 1``) are cropped in time to them (``temporal_crop``), and latents
    with fewer frames or another spatial size are skipped and counted (``too_short`` /
    ``shape_mismatch``), or refused before training when no row fits (or, under
    ``on_error: raise``, when any row does not).
    """

    __pydantic_config__ = _PYDANTIC_CONFIG

    path: str | None = None
    """Folder of parquet shards (null: pass it later)."""
    text_only: bool = False
    """The shards hold only text embeddings (data-free distillation; needs
    dmd.rollout: simulate)."""
    cfg_dropout: float = 0.0
    """Probability of replacing a sample's text condition by the empty / negative one
    (for flow; 0 for distillation)."""
    num_workers: int = 4
    """DataLoader worker processes (0: read in the training process)."""
    num_frames: int = 61
    """Clip length in frames (the latent shape of simulated rollouts and validation
    videos; the training size in data mode)."""
    height: int = 448
    """Clip height in pixels (a multiple of 16)."""
    width: int = 832
    """Clip width in pixels (a multiple of 16)."""
    text_length: int = 512
    """Tokens the text embeddings are padded to (the model's text length; Wan: 512)."""
    on_error: Literal["raise", "skip"] = "raise"
    """A corrupt shard or row: raise (an error naming the file and row) or skip
    (skipped and counted per reason in the log, the trackers and summary.json)."""
    max_skip_fraction: float = 0.05
    """A run that has skipped more than this fraction of the rows it read stops with an
    error naming the files and rows; 0: any skipped row stops it, 1: never."""
    max_abs_latent: float | None = 1000.0
    """Latents (normalised, ~N(0, 1)) larger in magnitude than this are a corrupt row
    (non_finite, like NaN / inf); null: only NaN / inf are."""
    temporal_crop: Literal["random", "first"] = "random"
    """Which latent frames of a longer clip train: random (a latent-aligned start drawn
    from train.seed per epoch and sample, the same on resume) or first (as FastVideo)."""

    def __post_init__(self) -> None:
        _check_path(
            self,
            "path",
            optional=True,
            fix="give the folder of parquet shards (or null to pass it later)",
        )
        if not isinstance(self.text_only, bool):
            _fail(self, "text_only", f"must be true or false, got {self.text_only!r}")
        _check_range(self, "cfg_dropout", 0.0, 1.0, hi_open=True)
        _check_int(self, "num_workers", 0)
        _check_int(self, "text_length", 1, fix=" (Wan's text encoder gives 512 tokens)")
        _check_choice(self, "on_error", ("raise", "skip"))
        _check_range(
            self,
            "max_skip_fraction",
            0.0,
            1.0,
            fix=" (the fraction of rows read that may be skipped; 0.05 = 5%)",
        )
        if self.max_abs_latent is not None:
            _check_range(
                self,
                "max_abs_latent",
                0.0,
                None,
                lo_open=True,
                fix=" (normalised latents are ~N(0, 1): e.g. 1000; null: NaN / inf only)",
            )
        _check_choice(self, "temporal_crop", ("random", "first"))
        # The VAE's own temporal factor (4 for Wan: 4k + 1 frames) is checked against the
        # model folder when training starts (fastwan.train.build.latent_shape_of).
        _check_int(self, "num_frames", 1)
        for name in ("height", "width"):
            _check_int(self, name, 16)
            if getattr(self, name) % 16:
                _fail(
                    self, name, f"must be a multiple of 16 (VAE x patch), got {getattr(self, name)}"
                )


# Wan's attention and feed-forward projections (peft names: a module whose dotted name is,
# or ends with, one of these): self- and cross-attention q, k, v, out and the FFN's two.
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
_GATE_MODULE = "to_gate_compress"  # fastwan.models.vsa.GATE_NAME (not imported: torch)


@dataclass
class LoRAConfig:
    """LoRA: low-rank adapters (peft) train instead of whole networks (rank 0: off).

    ``dmd`` with ``shared_base``: the student and the critic are two adapters on one
    frozen base that is also the teacher (teacher: adapters off, dense attention; student:
    its adapter and VSA; critic: its adapter, dense), so one copy of the base weights is
    held, and only the adapters (and the student's VSA gates) have gradients and AdamW
    states. The base is stored in ``model.teacher_dtype``, the adapters (and full gates) in
    ``model.dtype``. ``flow``: one adapter on the fine-tuned network.
    """

    __pydantic_config__ = _PYDANTIC_CONFIG

    rank: int = 0
    """Rank r of every adapter; 0: no LoRA (the networks train in full)."""
    alpha: float | None = None
    """The update is (alpha / rank) B A; null: alpha = rank (scale 1)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    """Linear layers that get an adapter: those whose dotted name is, or ends with, one of
    these (peft's rule). Default: attention q, k, v, out and the FFN of every block."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    init: Literal[LORA_INITS] = "default"
    """How A starts: default (kaiming-uniform, as peft) or gaussian (N(0, 1/rank)); B
    starts at zero, so every adapted network starts as its base. Seeded by train.seed."""
    gates: Literal[LORA_GATES] = "lora"
    """The student's VSA gates: lora (a rank-r adapter on each gate, its base frozen) or
    full (the gate weights themselves train)."""
    shared_base: bool = True
    """dmd: student, critic and teacher share one frozen base (model.student and
    model.critic must be null); false: the critic gets its own frozen base (model.critic,
    default the teacher's weights), and so does the student when model.student is set."""

    def __post_init__(self) -> None:
        _check_int(self, "rank", 0, fix=" (0 disables LoRA; e.g. 32)")
        if self.alpha is not None:
            _check_range(self, "alpha", 0.0, None, lo_open=True, fix=" (null: alpha = rank)")
        targets = self.target_modules
        if (
            not isinstance(targets, list)
            or not targets
            or any(not isinstance(t, str) or not t.strip() for t in targets)
        ):
            _fail(
                self,
                "target_modules",
                f"must be a non-empty list of module names, got {targets!r}; e.g. "
                f"{list(LORA_TARGET_MODULES)}",
            )
        gate = [t for t in targets if t.split(".")[-1] == _GATE_MODULE]
        if gate:
            _fail(
                self,
                "target_modules",
                f"names the VSA gates ({gate[0]!r}); remove it: lora.gates (lora | full) "
                "decides how the student's gates train",
            )
        _check_range(self, "dropout", 0.0, 1.0, hi_open=True)
        _check_choice(self, "init", LORA_INITS)
        _check_choice(self, "gates", LORA_GATES)
        if not isinstance(self.shared_base, bool):
            _fail(self, "shared_base", f"must be true or false, got {self.shared_base!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale_alpha(self) -> float:
        """The alpha in effect (alpha, or rank when alpha is null)."""
        return float(self.alpha) if self.alpha is not None else float(self.rank)


@dataclass
class Recipe:
    """A whole training configuration; checks that span sections run here."""

    __pydantic_config__ = _PYDANTIC_CONFIG

    model: ModelConfig
    """Teacher / student / critic weights and dtypes."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Method, steps, batch sizes, seed, precision, EMA, intervals, validation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """World size and the device mesh."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and clip size."""
    optim: OptimConfigs = field(default_factory=OptimConfigs)
    """Generator and critic optimisers."""
    dmd: DMDConfig = field(default_factory=DMDConfig)
    """DMD2 distillation."""
    vsa: VSAConfig = field(default_factory=VSAConfig)
    """Video Sparse Attention."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters instead of whole trainable networks (rank 0: off)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _SECTION_TYPES[f.name]
            if not isinstance(value, expected):
                raise ConfigError(
                    f.name, f"must be a {expected.__name__}, got {type(value).__name__}"
                )
        t, p, lora = self.train, self.parallel, self.lora
        dp = p.data_parallel_size
        expected_batch = t.micro_batch_size * t.gradient_accumulation_steps * dp
        if t.global_batch_size != expected_batch:
            per_rank = t.global_batch_size / dp
            hint = ""
            if per_rank == int(per_rank) and int(per_rank) % t.micro_batch_size == 0:
                hint = (
                    f"; for this mesh set train.gradient_accumulation_steps: "
                    f"{int(per_rank) // t.micro_batch_size}"
                )
            raise ConfigError(
                "global_batch_size",
                f"{t.global_batch_size} must equal train.micro_batch_size x "
                f"train.gradient_accumulation_steps x data-parallel size (parallel.replicate x "
                f"parallel.shard) = {t.micro_batch_size} x {t.gradient_accumulation_steps} x "
                f"{dp} = {expected_batch}{hint}",
                "train",
            )
        if t.method == "dmd" and self.data.text_only and self.dmd.rollout != "simulate":
            raise ConfigError(
                "rollout",
                "is 'data' but data.text_only is true: a data rollout noises video latents, "
                "which a text-only dataset lacks; set dmd.rollout: simulate",
                "dmd",
            )
        if t.method == "dmd" and self.dmd.gan:
            if self.data.text_only:
                raise ConfigError(
                    "text_only",
                    "is true but dmd.gan_generator_weight > 0: the GAN term tells real video "
                    "latents from the student's, so it needs a dataset with latents "
                    "(data.text_only: false), or set dmd.gan_generator_weight and "
                    "dmd.gan_critic_weight to 0",
                    "data",
                )
            if lora.enabled:
                raise ConfigError(
                    "gan_generator_weight",
                    "> 0 is not supported with LoRA (lora.rank > 0) yet: the GAN head trains "
                    "with a full critic; set dmd.gan_generator_weight and dmd.gan_critic_weight "
                    "to 0, or lora.rank: 0",
                    "dmd",
                )
            if p.world_size > 1:
                raise ConfigError(
                    "gan_generator_weight",
                    f"> 0 is supported on one process only for now (parallel.world_size is "
                    f"{p.world_size}): the GAN head is not sharded; set dmd.gan_generator_weight "
                    "and dmd.gan_critic_weight to 0 for multi-GPU runs",
                    "dmd",
                )
        if t.method == "flow" and self.data.text_only:
            raise ConfigError(
                "text_only",
                "is true but train.method is 'flow', which regresses on video latents; "
                "use a dataset with latents (data.text_only: false)",
                "data",
            )
        for role in ("generator", "critic"):
            opt = getattr(self.optim, role)
            if opt.warmup_steps > t.max_steps:
                raise ConfigError(
                    "warmup_steps",
                    f"{opt.warmup_steps} exceeds train.max_steps ({t.max_steps}); lower it",
                    f"optim.{role}",
                )
        if t.ema_start_step > t.max_steps:
            raise ConfigError(
                "ema_start_step",
                f"{t.ema_start_step} exceeds max_steps ({t.max_steps}): EMA would never start",
                "train",
            )
        if lora.enabled and t.method == "dmd" and lora.shared_base:
            for role in ("student", "critic"):
                if getattr(self.model, role) is not None:
                    raise ConfigError(
                        role,
                        f"is {getattr(self.model, role)!r} but lora.shared_base is true: the "
                        f"{role} is an adapter on the teacher's weights; set model.{role}: null, "
                        "or lora.shared_base: false to give it a base of its own",
                        "model",
                    )


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfigs,
    "dmd": DMDConfig,
    "vsa": VSAConfig,
    "lora": LoRAConfig,
}


# ------------------------------------------------------------- YAML <-> dataclasses (pydantic)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading exponent numbers without a dot (``1e-5``) as floats,
    as YAML 1.2 does (PyYAML's YAML 1.1 rules make them strings)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


@functools.cache
def _adapter() -> TypeAdapter:
    """pydantic's validator / serializer of :class:`Recipe` (built on first use)."""
    return TypeAdapter(Recipe)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _without_none(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    args = typing.get_args(tp)
    if type(None) in args and typing.get_origin(tp) is not Literal:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _type_at(loc: Sequence[str | int]) -> Any:
    """The annotation at a pydantic error location (``None`` where the schema has none)."""
    tp: Any = Recipe
    for part in loc:
        tp = _without_none(tp)[0]
        if isinstance(part, int):
            args = typing.get_args(tp)
            if typing.get_origin(tp) is tuple and len(args) > part and args[-1] is not Ellipsis:
                tp = args[part]
            else:
                tp = args[0] if args else None
        elif _is_dataclass_type(tp) and part in _hints(tp):
            tp = _hints(tp)[part]
        else:
            return None
    return tp


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    return repr(value)


def _unknown_key_error(path: str, key: str, valid: Sequence[str]) -> ConfigError:
    where = path or "the recipe"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    full = f"{path}.{key}" if path else key
    return ConfigError(full, f"unknown key{hint}; valid keys in {where}: {', '.join(valid)}", "")


# pydantic error types -> what the field must be
_WANTS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
}


def _config_error(error: ValidationError, overridden: Mapping[str, str]) -> ConfigError:
    """pydantic's first error as a :class:`ConfigError` naming the dotted field and the fix.

    ``overridden``: dotted fields set by overrides (their strings are no quoted YAML)."""
    e = error.errors(include_url=False)[0]
    loc, kind, value = tuple(e["loc"]), e["type"], e.get("input")
    path = _dotted(loc)
    tp = _type_at(loc)
    ctx = e.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, ConfigError):  # a dataclass's own check (__post_init__)
        if not cause.where or (tp is not None and cause.where == getattr(tp, "__name__", "")):
            return cause.at(path)
        return cause
    if kind in ("missing", "missing_argument"):
        if loc and isinstance(loc[-1], int):  # a fixed-length tuple given fewer items
            want = len(typing.get_args(_without_none(_type_at(loc[:-1]))[0]))
            return ConfigError(
                _dotted(loc[:-1]), f"must have {want} items, got {len(value)}: {value!r}", ""
            )
        if _is_dataclass_type(tp):  # a missing section: name its first required key
            required = [
                f.name
                for f in dataclasses.fields(tp)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            loc, path = (*loc, required[0]), f"{path}.{required[0]}"
        where = _dotted(loc[:-1]) or "the recipe"
        return ConfigError(path, f"is required; set it in {where} or with --{path}=VALUE", "")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        section = _type_at(loc[:-1])
        return _unknown_key_error(_dotted(loc[:-1]), str(loc[-1]), list(_hints(section)))
    if kind in ("too_long", "too_short") and isinstance(value, (list, tuple)):
        want = len(typing.get_args(_without_none(tp)[0]))
        return ConfigError(path, f"must have {want} items, got {len(value)}: {value!r}", "")
    if kind in ("dataclass_type", "dataclass_exact_type", "model_type", "dict_type"):
        return ConfigError(
            path or "recipe", f"must be a mapping of keys to values, got {value!r}", ""
        )
    if kind == "literal_error":
        choices = typing.get_args(_without_none(tp)[0]) if tp is not None else ()
        listed = ", ".join(map(repr, choices)) if choices else ctx.get("expected", "")
        return ConfigError(path, f"must be one of {listed}; got {value!r}", "")
    if kind in ("list_type", "tuple_type"):
        fix = "; write a YAML list [a, b]" if isinstance(value, str) else ""
        return ConfigError(path, f"must be a list, got {_shown(value)}{fix}", "")
    if kind in _WANTS:
        field_path = re.sub(r"\[\d+\]", "", path)
        if isinstance(value, str) and kind != "string_type" and field_path not in overridden:
            example = "" if isinstance(loc[-1], int) else f" ({loc[-1]}: {value.strip()})"
            return ConfigError(
                path,
                f"must be {_WANTS[kind]}, got the string {value!r}; remove the quotes in the "
                f"YAML{example}",
                "",
            )
        fix = "; quote it in YAML" if kind == "string_type" and value is not None else ""
        return ConfigError(path, f"must be {_WANTS[kind]}, got {_shown(value)}{fix}", "")
    return ConfigError(path or "recipe", f"{e['msg']} (got {_shown(value)})", "")


def _empty_sections(data: Any, cls: type = Recipe) -> Any:
    """A section with nothing under it (``train:``, YAML null) holds its defaults."""
    if not isinstance(data, Mapping):
        return data
    out = dict(data)
    for name, tp in _hints(cls).items():
        if _is_dataclass_type(tp) and name in out:
            out[name] = {} if out[name] is None else _empty_sections(out[name], tp)
    return out


def _validate(data: Any, overridden: Mapping[str, str] = {}) -> Recipe:  # noqa: B006
    """YAML-like nested dicts -> a validated :class:`Recipe`, by pydantic in strict JSON
    mode (YAML's data model is JSON's): no string is read as a number or bool."""
    try:
        text = json.dumps(_empty_sections(data), default=str, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ConfigError("recipe", f"holds a key or value YAML recipes cannot: {err}", "") from err
    try:
        return _adapter().validate_json(text, strict=True)
    except ValidationError as err:
        raise _config_error(err, overridden) from None


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """Build and validate a :class:`Recipe` from nested dicts (YAML-like values)."""
    return _validate(data)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Nested plain dicts / lists / scalars (tuples become lists), in field order."""
    return _adapter().dump_python(recipe, mode="json")


# -------------------------------------------------------------------------- overrides


def _split_override(item: str) -> tuple[list[str], str]:
    text = item.strip()
    stripped = text.lstrip("-")
    if "=" not in stripped:
        raise ValueError(
            f"override {item!r} must look like section.key=value "
            "(e.g. --optim.generator.lr=2e-5 or train.max_steps=10)"
        )
    key, value = stripped.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ValueError(f"override {item!r} has an empty key; write section.key=value")
    return parts, value


_NULLS = ("null", "Null", "NULL", "~")


def _override_value(text: str, tp: Any) -> Any:
    """An override's text as the value YAML gives after ``key:`` in a recipe; text fields
    (and choices) take it verbatim, though ``null`` still clears an optional one."""
    base, optional = _without_none(tp)
    if optional and text.strip() in _NULLS:
        return None
    if base is str or typing.get_origin(base) is Literal or not text.strip():
        return text
    try:
        return _load_yaml(text)
    except yaml.YAMLError:
        return text  # refused by the field's type, naming it


def _apply_override(data: dict[str, Any], item: str) -> str:
    """Set one ``section.key=value`` in ``data``, checking the path against the schema;
    returns the dotted field."""
    parts, text = _split_override(item)
    cls: Any = Recipe
    node = data
    for depth, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise _unknown_key_error(".".join(parts[:depth]), part, list(hints))
        tp = hints[part]
        here = ".".join(parts[: depth + 1])
        if depth == len(parts) - 1:
            if _is_dataclass_type(tp):
                keys = ", ".join(_hints(tp))
                raise ConfigError(
                    here, f"is a section, not a value; override one of its keys: {keys}", ""
                )
            node[part] = _override_value(text, tp)
            return here
        if not _is_dataclass_type(tp):
            raise ConfigError(here, f"is a value, not a section; write {here}=VALUE", "")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = tp
    raise AssertionError("unreachable")  # pragma: no cover


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    applied: dict[str, str] = {}
    for item in overrides:
        try:
            applied[_apply_override(data, item)] = item
        except ConfigError as err:
            raise ConfigError(
                err.field_name, f"{err.message} [override {item!r}]", err.where
            ) from None
    return applied


def check_override_key(key: str) -> None:
    """A :class:`ConfigError` unless ``key`` (``section.key``, leading dashes allowed) names
    a recipe field: an unknown key names the valid ones of its section (did you mean)."""
    _apply_override({}, f"{key.split('=', 1)[0]}=")


def parse_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to the nested dict ``data`` (in place).

    Keys are checked against the recipe schema (unknown ones raise with the valid keys of
    that section); values are read as YAML by the field's type (text fields verbatim) and
    checked when the recipe is built.
    """
    _apply_overrides(data, overrides)
    return data


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, build and validate the :class:`Recipe`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"recipe file {str(path)!r} does not exist; see recipes/*.yaml") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(
            f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}"
        )
    overridden = _apply_overrides(data, overrides)
    try:
        return _validate(data, overridden)
    except ConfigError as err:
        item = overridden.get(re.sub(r"\[\d+\]", "", err.path))
        where = f"override {item!r}" if item is not None else f"in {path}"
        raise ConfigError(err.field_name, f"{err.message} [{where}]", err.where) from None


class _RecipeDumper(yaml.SafeDumper):
    """Block-style mappings; lists of numbers on one line ([1000, 757, 522])."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(x, (int, float)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


def dump_recipe(recipe: Recipe, path: str | Path | None = None) -> str:
    """The recipe as YAML (section order kept); also written to ``path`` when given."""
    text = yaml.dump(
        recipe_to_dict(recipe),
        Dumper=_RecipeDumper,
        sort_keys=False,
        default_flow_style=False,
        width=100,
        allow_unicode=True,
    )
    if path is not None:
        Path(path).write_text(text)
    return text


# ------------------------------------------------------------------ command-line options


@dataclass(frozen=True)
class RecipeOption:
    """One recipe field as a command-line option ``--<name>=VALUE``."""

    name: str
    """The dotted field, e.g. ``optim.generator.lr``."""
    section: str
    """Its dotted section, e.g. ``optim.generator``."""
    section_help: str
    """The section's description (the first paragraph of its class docstring)."""
    metavar: str
    """What the value is: ``FLOAT``, ``INT``, ``{a,b}``, ``[INT,INT,INT]``, ``X|null``."""
    help: str
    """The field's docstring."""
    default: str | None
    """The default as override text (``None``: the field is required)."""


_METAVARS = {"integer": "INT", "number": "FLOAT", "boolean": "{true,false}", "string": "TEXT"}


def _metavar(prop: Mapping[str, Any]) -> str:
    if "anyOf" in prop:
        kinds = [_metavar(p) for p in prop["anyOf"] if p.get("type") != "null"]
        null = any(p.get("type") == "null" for p in prop["anyOf"])
        return "|".join(kinds) + ("|null" if null else "")
    if "enum" in prop:
        return "{" + ",".join(map(str, prop["enum"])) + "}"
    if prop.get("type") == "array":
        if "prefixItems" in prop:
            return "[" + ",".join(_metavar(p) for p in prop["prefixItems"]) + "]"
        return "[" + _metavar(prop.get("items", {})) + ",...]"
    return _METAVARS.get(prop.get("type", ""), "VALUE")


def _first_paragraph(doc: str | None) -> str:
    text = (doc or "").strip().split("\n\n")[0]
    return " ".join(text.replace("``", "").split())


def recipe_fields() -> tuple[str, ...]:
    """Every recipe field as its dotted name, in recipe order (cheap: no pydantic schema,
    for registering command-line options; :func:`recipe_options` has their help)."""

    def walk(cls: type, prefix: str) -> list[str]:
        out: list[str] = []
        for name, tp in _hints(cls).items():
            dotted = f"{prefix}.{name}" if prefix else name
            out.extend(walk(tp, dotted) if _is_dataclass_type(tp) else [dotted])
        return out

    return tuple(walk(Recipe, ""))


@functools.cache
def recipe_options() -> tuple[RecipeOption, ...]:
    """Every recipe field, in recipe order, with its help (its docstring, through pydantic's
    JSON schema), the kind of value it takes and its default."""
    schema = _adapter().json_schema()
    defs = schema.get("$defs", {})
    out: list[RecipeOption] = []

    def walk(props: Mapping[str, Any], cls: type, prefix: str) -> None:
        defaults = {f.name: f for f in dataclasses.fields(cls)}
        for name, prop in props.items():
            dotted = f"{prefix}.{name}" if prefix else name
            tp = _hints(cls)[name]
            if _is_dataclass_type(tp):
                ref = prop["$ref"].rsplit("/", 1)[-1]
                walk(defs[ref]["properties"], tp, dotted)
                continue
            f = defaults[name]
            if f.default is not dataclasses.MISSING:
                default: str | None = _override_text(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = _override_text(f.default_factory())
            else:
                default = None
            out.append(
                RecipeOption(
                    name=dotted,
                    section=prefix,
                    section_help=_first_paragraph(cls.__doc__),
                    metavar=_metavar(prop),
                    help=" ".join(prop.get("description", "").split()),
                    default=default,
                )
            )

    walk(schema["properties"], Recipe, "")
    return tuple(out)


# ------------------------------------------------------------------------------ resume

# Fields a resumed run may change ("section.*": any field of the section). What they do on
# resume: loop lengths and intervals, logging, validation and trackers take the new value;
# the mesh and performance settings (parallel.*, data.num_workers, vsa.backend) reshard or
# re-run the same math; optim.<role>.lr / weight_decay are written into the restored
# optimizer and LR schedule (the schedule's position is kept); grad_clip is read every
# step; the data error policy and bounds apply to the rows read from then on; the
# accumulation count can only change with the mesh (the global batch may not).
RESUME_SAFE_FIELDS: tuple[str, ...] = (
    "train.max_steps",
    "train.gradient_accumulation_steps",
    "train.log_interval",
    "train.validation_interval",
    "train.checkpoint_interval",
    "train.checkpoints_total_limit",
    "train.output_dir",
    "train.validation_prompts",
    "train.validation_seeds",
    "train.validation_steps",
    "train.validation_guidance_scale",
    "train.validation_sampler",
    "train.validation_fps",
    "train.validation_grid_frames",
    "train.report_to",
    "train.tracker_project",
    "parallel.*",
    "data.num_workers",
    "data.on_error",
    "data.max_skip_fraction",
    "data.max_abs_latent",
    "optim.*.lr",
    "optim.*.weight_decay",
    "optim.*.grad_clip",
    "vsa.backend",
)


def _is_resume_safe(name: str) -> bool:
    parts = name.split(".")
    for pattern in RESUME_SAFE_FIELDS:
        want = pattern.split(".")
        if want[-1] == "*" and len(want) == 2 and parts[0] == want[0]:
            return True
        if len(want) == len(parts) and all(w in ("*", p) for w, p in zip(want, parts)):
            return True
    return False


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


_MISSING = object()


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b  # YAML round trips floats exactly (repr)
    return a == b


def load_recipe_dict(path: str | Path) -> dict[str, Any]:
    """A saved recipe (``recipe.yaml`` of a run or a checkpoint) as nested dicts, read
    with the recipe loader but not validated (a recipe saved by another version of
    fastwan may not validate here)."""
    path = Path(path)
    try:
        data = _load_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(
            f"cannot read the saved recipe {str(path)!r} ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"the saved recipe {str(path)!r} is not a mapping of sections")
    return data


def recipe_changes(old: Mapping[str, Any], new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> ``(old value, new value)`` for every field of ``new`` whose value
    differs from the saved recipe ``old`` (nested dicts, as :func:`recipe_to_dict` or a
    saved ``recipe.yaml`` give). A field the saved recipe lacks (added to fastwan since)
    compares with its default; fields fastwan no longer has are ignored."""
    new_flat = _flatten(recipe_to_dict(new))
    old_flat = _flatten(old)
    defaults = _flatten(recipe_to_dict(Recipe(model=ModelConfig(teacher=new.model.teacher))))
    changes: dict[str, tuple[Any, Any]] = {}
    for name, value in new_flat.items():
        before = old_flat.get(name, defaults.get(name, _MISSING))
        if before is _MISSING or not _same_value(before, value):
            changes[name] = (None if before is _MISSING else before, value)
    return changes


def _override_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_override_text(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value) if (not value or any(c in value for c in " ,[]'\"")) else value
    return repr(value)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]} ({len(text)} chars)"


def resume_changes(
    old: Mapping[str, Any], new: Recipe, checkpoint: str | Path
) -> dict[str, tuple[Any, Any]]:
    """The changes from the saved recipe ``old`` (of ``checkpoint``) to ``new`` when all of
    them are safe to make on resume (:data:`RESUME_SAFE_FIELDS`); otherwise a
    :class:`ConfigError` naming every unsafe field, old -> new, and the fix."""
    changes = recipe_changes(old, new)
    unsafe = {k: v for k, v in changes.items() if not _is_resume_safe(k)}
    if unsafe:
        listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in unsafe.items())
        revert = " ".join(
            f"--{k}={text}" if len(text := _override_text(a)) <= 80 else f"--{k}=<saved value>"
            for k, (a, _b) in unsafe.items()
        )
        first = next(iter(unsafe))
        raise ConfigError(
            first,
            f"cannot change on resume from {str(checkpoint)!r}, which trained with the saved "
            f"values ({len(unsafe)} field{'s' if len(unsafe) > 1 else ''} changed: {listed}). "
            f"Revert {'them' if len(unsafe) > 1 else 'it'} ({revert}) to resume, or start a "
            "new run in another train.output_dir (without --resume). Fields that may change "
            f"on resume: {', '.join(RESUME_SAFE_FIELDS)}",
            "",
        )
    return changes
