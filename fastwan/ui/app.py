"""The web UI behind ``fastwan ui``: plain handler functions, and the Gradio page around them.

:class:`FastWanUI` holds the models and the limits and does the work (validate the inputs,
generate, write the MP4, time it); it knows nothing of Gradio, so it is tested directly.
:func:`build_app` lays out the Gradio ``Blocks`` page and wires its events to the handlers
through small adapters that turn errors into a message in the page (the server keeps
serving). Nothing the browser sends is used as a file path: inputs are text and numbers,
checked against the allowed values, and videos are written to a folder the server owns; an
image (image to video) is read only from Gradio's own upload folder, where uploads land.

Every input reaches the handlers as sent (the events skip Gradio's own preprocessing), so a
bad value from the page or from the API (``gradio_client``) is refused by the checks here
with a message naming the field and the fix, raised as a ``gr.Error``: API clients get it
as the call's error, and the page shows it in a toast and in the status line.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import threading
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # type hints only: importing gradio / the pipeline is slow
    import gradio as gr

    from fastwan.pipeline import VideoGenerator

ATTENTION_CHOICES = ("vsa", "dense")
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1  # the seeds fastwan.pipeline takes (its MAX_SEED): 0 .. 2**63 - 1
RANDOM_SEED_MAX = 2**32 - 1  # the random-seed button draws short, readable seeds
MAX_LORA_SCALE = 2.0  # the LoRA scale slider's top
MAX_MULTI_STEPS = 100  # the steps slider of a many-step model
# (numerator, denominator) aspect ratios offered in both orientations.
ASPECTS = ((1, 1), (4, 3), (16, 9))
GENERIC_EXAMPLES = (
    "A red fox runs through snow, realistic style.",
    "A cat walks on the grass, realistic style.",
    "Waves crash against a rocky shore at sunset.",
)


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class SizeOptions:
    """The resolutions and frame counts offered, all of which the model takes."""

    resolutions: tuple[tuple[int, int], ...]  # (height, width), fewest pixels first
    frame_counts: tuple[int, ...]
    default_resolution: tuple[int, int]
    default_frames: int

    @property
    def resolution_labels(self) -> list[str]:
        return [resolution_label(h, w) for h, w in self.resolutions]

    def parse_resolution(self, label: Any) -> tuple[int, int]:
        """``"WxH"`` (one of :attr:`resolution_labels`) -> ``(height, width)``."""
        for h, w in self.resolutions:
            if label == resolution_label(h, w):
                return h, w
        raise ValueError(
            f"resolution must be one of {self.resolution_labels} (width x height), got "
            f"{_shown(label)}"
        )

    @property
    def frame_labels(self) -> list[str]:
        """The frame counts as the page lists them (and the API declares them): text."""
        return [str(n) for n in self.frame_counts]

    def parse_frames(self, value: Any) -> int:
        """A frame count from :attr:`frame_counts`: an int, or its decimal text (as listed)."""
        frames = _as_int(value)
        if frames is None or frames not in self.frame_counts:
            raise ValueError(
                f"num_frames must be one of {self.frame_labels} (an int or its text), got "
                f"{_shown(value)}; pick one from the Frames list"
            )
        return frames


def resolution_label(height: int, width: int) -> str:
    return f"{width}x{height}"


def size_options(
    *,
    vae_scale: tuple[int, int],
    patch_size: Sequence[int],
    tile_size: Sequence[int],
    native: tuple[int, int, int],
    max_frames: int,
    max_pixels: int,
) -> SizeOptions:
    """Sizes a Wan model takes, within the caps.

    vae_scale: (temporal, spatial) VAE factor; patch_size: the transformer's (t, h, w) patch;
    tile_size: the VSA tile in tokens (t, h, w); native: the preset's (height, width,
    num_frames). Sides are multiples of VAE x patch (what the model takes); the short side
    starts at one VSA tile (one tile of tokens per side) and doubles, at aspect ratios
    1:1, 4:3 and 16:9 both ways, plus the native size. Frame counts are 1 + k x the VAE's
    temporal factor (any count when it is 1), up to ``max_frames``.
    """
    st, ss = (int(x) for x in vae_scale)
    _, ph, pw = (int(x) for x in patch_size)
    _, th, tw = (int(x) for x in tile_size)
    height, width, frames = native
    for name, value in (("max_frames", max_frames), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    step_h, step_w = ss * ph, ss * pw  # one latent token of the transformer, in pixels
    step = math.lcm(step_h, step_w)  # a side valid as height and as width

    sizes: set[tuple[int, int]] = set()
    if height * width <= max_pixels and height % step_h == 0 and width % step_w == 0:
        sizes |= {(height, width)}
    short = step * max(th, tw)  # one VSA tile of tokens
    if short * short > max_pixels:
        short = step  # caps below one tile: whole tokens only
    while short * short <= max_pixels:
        for num, den in ASPECTS:
            long = max(short, round(short * num / den / step) * step)
            if short * long <= max_pixels:
                sizes |= {(short, long), (long, short)}
        short *= 2
    if not sizes:
        raise ValueError(
            f"max_pixels={max_pixels} is below the smallest size the model takes "
            f"({step}x{step} = {step * step} pixels); raise --max-pixels"
        )
    resolutions = tuple(sorted(sizes, key=lambda hw: (hw[0] * hw[1], hw[1], hw[0])))

    frame_counts = tuple(range(1, max_frames + 1, st))
    default_res = (height, width) if (height, width) in sizes else resolutions[-1]
    default_frames = frames if frames in frame_counts else frame_counts[-1]
    return SizeOptions(resolutions, frame_counts, default_res, default_frames)


# --------------------------------------------------------------------------- models
class LazyModel:
    """A :class:`VideoGenerator` loaded on first use.

    A failed load is reported as a ``ValueError`` naming the role and the source, and is
    tried again on the next call (the server stays up; a fixed folder is picked up).
    """

    def __init__(
        self,
        role: str,
        source: str | Callable[[], str],
        loader: Callable[[str], VideoGenerator],
    ) -> None:
        self.role = role
        self._source = source
        self._loader = loader
        self._model: VideoGenerator | None = None
        self._lock = threading.Lock()

    @classmethod
    def ready(cls, role: str, model: VideoGenerator) -> LazyModel:
        """Wrap an already loaded generator."""
        slot = cls(role, str(model.components.path), lambda _: model)
        slot._model = model
        return slot

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def peek(self) -> VideoGenerator | None:
        return self._model

    def get(self) -> VideoGenerator:
        with self._lock:
            if self._model is not None:
                return self._model
            source = "?"
            try:
                source = self._source() if callable(self._source) else self._source
                self._model = self._loader(source)
            except (ValueError, OSError, RuntimeError, ImportError) as err:
                raise ValueError(
                    f"the {self.role} model failed to load from {source!r}: {err}"
                ) from err
            return self._model


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class VideoResult:
    """One generated video, written to ``path`` (a file in the server's output folder)."""

    path: Path
    seed: int
    timings: dict[str, float]  # seconds: text_encode, denoise, decode, total
    height: int
    width: int
    num_frames: int
    fps: int
    setup: str  # e.g. "VSA 0.8, 3 DMD steps"


@dataclass(frozen=True)
class CompareResult:
    teacher: VideoResult
    student: VideoResult

    @property
    def speedup(self) -> float:
        """Teacher's total time over the student's."""
        return self.teacher.timings["total"] / max(self.student.timings["total"], 1e-9)

    @property
    def denoise_speedup(self) -> float:
        return self.teacher.timings["denoise"] / max(self.student.timings["denoise"], 1e-9)


# --------------------------------------------------------------------------- validation
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,40}")  # ASCII digits; long enough for any 64-bit int


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages quote what was sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"


def _as_int(value: Any) -> int | None:
    """An int from an int, an integral finite float or decimal text; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None  # inf and nan are not integers
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return None


def check_prompt(prompt: Any, name: str = "prompt", *, required: bool = True) -> str | None:
    """A prompt's text (None for an empty optional one), or a ValueError."""
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ValueError(f"{name} must be text, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(prompt)} characters; keep it under {MAX_PROMPT_CHARS}")
    if not prompt.strip():
        if required:
            raise ValueError(f"{name} is empty: type what the video should show")
        return None
    return prompt


def check_seed(seed: Any) -> int:
    """A seed in [0, MAX_SEED] (an int or its decimal text), or a ValueError with the fix."""
    fix = f"type a whole number from 0 to {MAX_SEED} (2**63 - 1), or click Random seed"
    value = _as_int(seed)
    if value is None:
        raise ValueError(f"seed must be a whole number, got {_shown(seed)}; {fix}")
    if value < 0:
        raise ValueError(
            f"seed must be >= 0 (negative seeds are not taken), got {_shown(seed)}; {fix}"
        )
    if value > MAX_SEED:
        raise ValueError(f"seed must be at most {MAX_SEED} (2**63 - 1), got {_shown(seed)}; {fix}")
    return value


def check_sparsity(attention: Any, sparsity: Any) -> tuple[str, float | None]:
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {_shown(attention)}")
    if attention == "dense":
        return "dense", None
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {_shown(sparsity)}")
    value = float(sparsity) if isinstance(sparsity, float) or abs(sparsity) < 2**53 else math.inf
    if not math.isfinite(value):
        raise ValueError(
            f"sparsity must be a finite number in [0, 1), got {_shown(sparsity)}; e.g. 0.8 skips "
            "80% of the key tiles"
        )
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"sparsity must be in [0, 1) (the fraction of key tiles skipped), got "
            f"{_shown(sparsity)}"
        )
    return "vsa", value


def check_lora_scale(value: Any, name: str = "lora_scale") -> float:
    """A LoRA strength in [0, MAX_LORA_SCALE] (0 = off, 1 = as trained)."""
    message = f"{name} must be a number in [0, {MAX_LORA_SCALE:g}], got {_shown(value)}"
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError(message)
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or not 0 <= scale <= MAX_LORA_SCALE:
        raise ValueError(message)
    return scale


def step_range(model: VideoGenerator) -> tuple[int, int, int]:
    """(min, max, default) steps: a few-step model runs a prefix of its DMD timesteps,
    a many-step model its scheduler with that many steps."""
    p = model.preset
    if p.few_step:
        return 1, len(p.timesteps), len(p.timesteps)
    return 1, max(MAX_MULTI_STEPS, p.num_inference_steps), p.num_inference_steps


def sampling_args(model: VideoGenerator, steps: Any, name: str = "steps") -> dict[str, Any]:
    """``generate`` keyword arguments for ``steps`` (0 or None: the model's default)."""
    lo, hi, default = step_range(model)
    value = default if steps in (None, 0, "") else _as_int(steps)
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{name} must be a whole number in [{lo}, {hi}], got {_shown(steps)}")
    if model.preset.few_step:  # each DMD step predicts x0; fewer steps stop earlier
        return {"timesteps": list(model.preset.timesteps[:value])}
    return {"num_inference_steps": value}


# --------------------------------------------------------------------------- handlers
class FastWanUI:
    """The UI's state and handlers: a student (the model the page generates with) and an
    optional teacher for compare mode.

    max_frames / max_pixels cap the sizes offered (default: the student's native size).
    Videos go to ``output_dir`` (default: a new temporary folder); the newest
    ``keep_videos`` it wrote are kept. One generation runs at a time (a lock, besides the
    queue).
    """

    def __init__(
        self,
        student: LazyModel,
        teacher: LazyModel | None = None,
        *,
        max_frames: int | None = None,
        max_pixels: int | None = None,
        vsa_backend: str = "auto",
        max_sequence_length: int | None = None,
        output_dir: str | Path | None = None,
        keep_videos: int = 64,
        examples: Sequence[str] | None = None,
        teacher_unavailable: str | None = None,
        loras: Sequence[tuple[str | Path, float]] = (),
    ) -> None:
        model = student.get()  # the page's sizes come from the student
        p = model.preset
        self.options = _within_model_limits(
            model,
            size_options(
                vae_scale=model.vae_scale,
                patch_size=model.transformer.config.patch_size,
                tile_size=p.tile_size,
                native=(p.height, p.width, p.num_frames),
                max_frames=p.num_frames if max_frames is None else max_frames,
                max_pixels=p.height * p.width if max_pixels is None else max_pixels,
            ),
        )
        if keep_videos < 1:
            raise ValueError(f"keep_videos must be >= 1, got {keep_videos}")
        self.student = student
        self.teacher = teacher
        self.teacher_unavailable = teacher_unavailable or (
            "compare mode needs a teacher: start the UI with --teacher PATH_OR_ID"
        )
        self.vsa_backend = vsa_backend
        self.max_sequence_length = max_sequence_length
        self._own_dir = output_dir is None  # a temporary folder of ours: removed by close()
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="fastwan-ui-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.keep_videos = keep_videos
        self.examples = list(examples) if examples else list(GENERIC_EXAMPLES)
        self._written: deque[Path] = deque()
        self._lock = threading.Lock()  # one generation at a time
        self._files_lock = threading.Lock()  # the videos written; never held while generating
        self._closed = False
        self._seed_rng = torch.Generator()
        self._seed_rng.seed()  # the random-seed button: fresh entropy, not a fixed seed
        # The student's LoRAs, loaded once; a request picks one (or none) and its scale.
        self.lora_defaults: dict[str, float] = {}
        for path, scale in loras:
            check_lora_scale(scale, "--lora scale")
            self.lora_defaults[model.load_lora(path, scale=scale)] = float(scale)

    # ---------------------------------------------------------------- defaults
    @property
    def student_model(self) -> VideoGenerator:
        return self.student.get()

    @property
    def default_attention(self) -> tuple[str, float]:
        attn = self.student_model.attention
        sparsity = attn["sparsity"] if attn["mode"] == "vsa" else self.student_model.preset.sparsity
        return attn["mode"], float(sparsity)

    def close(self) -> None:
        """Delete the videos written (and the output folder when it is a temporary one).

        Safe to call more than once and from an ``atexit`` hook or a signal's shutdown path:
        it never waits for a generation in progress, and a video that one writes after this
        is deleted as soon as it is written.
        """
        with self._files_lock:
            self._closed = True
            while self._written:
                self._written.popleft().unlink(missing_ok=True)
            if self._own_dir:
                shutil.rmtree(self.output_dir, ignore_errors=True)

    def random_seed(self) -> int:
        return int(torch.randint(0, RANDOM_SEED_MAX + 1, (1,), generator=self._seed_rng))

    @property
    def lora_fields(self) -> tuple[str, ...]:
        """The LoRA inputs the page and the API take after Generate's: none without LoRAs."""
        return LORA_FIELDS if self.lora_defaults else ()

    @property
    def takes_image(self) -> bool:
        """Whether the student is an image-to-video model (Wan2.2 TI2V, Wan2.1 I2V): the page
        then has an image-to-video tab and the compare tab takes an image."""
        return self.student_model.task != "t2v"

    @property
    def takes_last_image(self) -> bool:
        """Whether the student is a first-last-frame model (Wan2.1 FLF2V): the image inputs
        then come in pairs, first and last frame, both required."""
        return self.student_model.takes_last_image

    def resolution_for_image(self, image: Any) -> str:
        """The offered resolution nearest ``image``'s aspect ratio (then nearest the size
        the model picks for it, :meth:`VideoGenerator.default_size_for_image`): its label."""
        from fastwan.models.image_encoder import load_image

        img = load_image(image, "image")
        th, tw = self.student_model.default_size_for_image(img)
        aspect = img.width / img.height

        def distance(hw: tuple[int, int]) -> tuple[float, int]:
            h, w = hw
            return abs(math.log((w / h) / aspect)), abs(h * w - th * tw)

        return resolution_label(*min(self.options.resolutions, key=distance))

    # ---------------------------------------------------------------- handlers
    def generate(
        self,
        prompt: Any,
        negative_prompt: Any,
        seed: Any,
        steps: Any,
        attention: Any,
        sparsity: Any,
        resolution: Any,
        num_frames: Any,
        callback: Callable[[dict], None] | None = None,
        image: Any = None,
        lora: Any = None,
        lora_scale: Any = None,
        last_image: Any = None,
    ) -> VideoResult:
        """Generate one video with the student (from ``image``, its first frame, when given:
        a path, PIL image or array, and ``last_image``, its last, for a first-last-frame
        model; with ``lora`` at ``lora_scale``, one of the LoRAs the UI was started with, or
        ``"none"``); ValueError on any invalid input."""
        args = self._check(prompt, negative_prompt, seed, resolution, num_frames, image, last_image)
        args["lora"] = self._lora_choice(lora, lora_scale)
        mode, sp = check_sparsity(attention, sparsity)
        model = self.student.get()
        kwargs = sampling_args(model, steps)
        setup = _setup(mode, sp, kwargs)
        return self._run(model, "student", args, kwargs, setup, callback, attention=(mode, sp))

    def image_to_video(
        self,
        image: Any,
        *values: Any,
        callback: Callable[[dict], None] | None = None,
        **lora: Any,
    ) -> VideoResult:
        """:meth:`generate` (``values`` in its order, ``lora`` / ``lora_scale`` and
        ``last_image`` by name) from ``image``, which is required (and so is ``last_image``
        for a first-last-frame model)."""
        if image is None:
            raise ValueError("image: upload the first frame of the video (image to video)")
        return self.generate(*values, callback=callback, image=image, **lora)

    def compare(
        self,
        prompt: Any,
        negative_prompt: Any,
        seed: Any,
        steps: Any,
        teacher_steps: Any,
        attention: Any,
        sparsity: Any,
        resolution: Any,
        num_frames: Any,
        callback: Callable[[dict], None] | None = None,
        image: Any = None,
        lora: Any = None,
        lora_scale: Any = None,
        last_image: Any = None,
    ) -> CompareResult:
        """Teacher (its own attention and sampler, ``teacher_steps``; 0 = its default) and
        student on the same prompt, seed and size (and ``image``, the first frame, when
        given: both must be image-to-video models; ``last_image`` for first-last-frame
        ones); the student with ``lora``."""
        if self.teacher is None:
            raise ValueError(self.teacher_unavailable)
        args = self._check(prompt, negative_prompt, seed, resolution, num_frames, image, last_image)
        args["lora"] = self._lora_choice(lora, lora_scale)
        mode, sp = check_sparsity(attention, sparsity)
        student = self.student.get()
        s_kwargs = sampling_args(student, steps)
        teacher = self.teacher.get()
        if args["image"] is not None and teacher.task == "t2v":
            raise ValueError(
                f"image: the teacher {teacher.preset.name!r} is a text-to-video model; compare "
                "with an image needs an image-to-video teacher (--teacher), or clear the image"
            )
        t_kwargs = sampling_args(teacher, teacher_steps, "teacher_steps")
        teacher.latent_shape(1, args["height"], args["width"], args["num_frames"])
        t_attn = teacher.attention
        t_setup = _setup(t_attn["mode"], t_attn["sparsity"], t_kwargs)
        if teacher.preset.guidance_scale > 1:
            t_setup += f", CFG {teacher.preset.guidance_scale:g}"
        t_res = self._run(teacher, "teacher", {**args, "lora": None}, t_kwargs, t_setup, callback)
        s_res = self._run(
            student, "student", args, s_kwargs, _setup(mode, sp, s_kwargs), callback, (mode, sp)
        )
        return CompareResult(teacher=t_res, student=s_res)

    # ---------------------------------------------------------------- internals
    def _lora_choice(self, lora: Any, lora_scale: Any) -> tuple[str, float] | None:
        """``(name, scale)`` of the requested LoRA, or None for none."""
        if lora is None or lora in ("", "none"):
            return None
        if not self.lora_defaults:
            raise ValueError(
                f"lora: this UI was started without LoRAs, got {_shown(lora)}; start it with "
                "--lora PATH[:SCALE]"
            )
        if lora not in self.lora_defaults:
            raise ValueError(
                f"lora must be one of {['none', *self.lora_defaults]}, got {_shown(lora)}"
            )
        if lora_scale is None:
            return lora, self.lora_defaults[lora]
        return lora, check_lora_scale(lora_scale)

    def _check(
        self, prompt, negative_prompt, seed, resolution, num_frames, image=None, last_image=None
    ) -> dict[str, Any]:
        from fastwan.models.image_encoder import load_image

        if last_image is not None and image is None:
            raise ValueError("last_image: upload the first frame too (image)")
        if image is not None and last_image is None and self.takes_last_image:
            raise ValueError(
                f"last_image: {self.student_model.preset.name!r} is a first-last-frame model; "
                "upload the last frame of the video too"
            )
        height, width = self.options.parse_resolution(resolution)
        return dict(
            image=load_image(image, "image") if image is not None else None,
            last_image=load_image(last_image, "last_image") if last_image is not None else None,
            prompt=check_prompt(prompt),
            negative_prompt=check_prompt(negative_prompt, "negative_prompt", required=False),
            seed=check_seed(seed),
            height=height,
            width=width,
            num_frames=self.options.parse_frames(num_frames),
        )

    def _run(
        self,
        model: VideoGenerator,
        role: str,
        args: dict[str, Any],
        kwargs: dict[str, Any],
        setup: str,
        callback: Callable[[dict], None] | None,
        attention: tuple[str, float | None] | None = None,
    ) -> VideoResult:
        from fastwan.video_io import save_video

        if self.max_sequence_length is not None:
            kwargs = {**kwargs, "max_sequence_length": self.max_sequence_length}
        with self._lock:
            if attention is not None:  # the student's attention is per request
                model.set_attention(attention[0], sparsity=attention[1], backend=self.vsa_backend)
            if role == "student":  # and so are its LoRA and scale: the others off
                chosen = args.get("lora")
                for name in self.lora_defaults:
                    on = chosen is not None and name == chosen[0]
                    model.set_lora_scale(chosen[1] if on else 0.0, name)
            out = model.generate(
                args["prompt"],
                args["negative_prompt"],
                height=args["height"],
                width=args["width"],
                num_frames=args["num_frames"],
                seed=args["seed"],
                image=args["image"],
                last_image=args["last_image"],
                callback=callback,
                **kwargs,
            )
        path = self.output_dir / f"{role}-{args['seed']}-{uuid.uuid4().hex[:12]}.mp4"
        save_video(out.video, path, fps=out.fps)
        self._keep(path)
        f, h, w, _ = out.video.shape
        if args.get("lora") is not None:
            setup += f", LoRA {args['lora'][0]} x{args['lora'][1]:g}"
        if args["image"] is not None:
            setup += ", from the images" if args["last_image"] is not None else ", from the image"
        return VideoResult(path, args["seed"], dict(out.timings), h, w, f, out.fps, setup)

    def _keep(self, path: Path) -> None:
        """Remember ``path``; delete the videos written before the newest ``keep_videos``
        (and, once closed, this one: the server is stopping)."""
        with self._files_lock:
            if self._closed:
                path.unlink(missing_ok=True)
                if self._own_dir:
                    shutil.rmtree(self.output_dir, ignore_errors=True)
                raise ValueError("the UI is shutting down; the video was not kept")
            self._written.append(path)
            while len(self._written) > self.keep_videos:
                self._written.popleft().unlink(missing_ok=True)


def _within_model_limits(model: VideoGenerator, opts: SizeOptions) -> SizeOptions:
    """``opts`` less the sizes ``model`` refuses (past its rotary position table, say, when
    --max-frames / --max-pixels are above what it takes); a ValueError if none is left."""

    def takes(height: int, width: int, frames: int) -> bool:
        try:
            model.latent_shape(1, height, width, frames)
        except ValueError:
            return False
        return True

    small_h, small_w = opts.resolutions[0]
    frames = tuple(f for f in opts.frame_counts if takes(small_h, small_w, f))
    resolutions = tuple(hw for hw in opts.resolutions if frames and takes(*hw, frames[0]))
    if not frames or not resolutions:
        raise ValueError(
            f"the model takes none of the sizes offered ({opts.resolution_labels} at "
            f"{opts.frame_labels} frames); lower --max-frames / --max-pixels"
        )
    if (frames, resolutions) == (opts.frame_counts, opts.resolutions):
        return opts
    dropped = sorted(set(opts.frame_counts) - set(frames))
    print(
        f"fastwan ui: not offering sizes the model cannot take (its largest sizes); frame "
        f"counts left out: {dropped or 'none'}, resolutions left out: "
        f"{[resolution_label(*hw) for hw in opts.resolutions if hw not in resolutions] or 'none'}",
        file=sys.stderr,
    )
    res = opts.default_resolution if opts.default_resolution in resolutions else resolutions[-1]
    n = opts.default_frames if opts.default_frames in frames else frames[-1]
    return SizeOptions(resolutions, frames, res, n)


def _setup(mode: str, sparsity: float | None, kwargs: dict[str, Any]) -> str:
    attn = f"VSA {sparsity:g}" if mode == "vsa" else "dense"
    if "timesteps" in kwargs:
        n = len(kwargs["timesteps"])
        return f"{attn}, {n} DMD step{'s' * (n != 1)}"
    n = kwargs["num_inference_steps"]
    return f"{attn}, {n} step{'s' * (n != 1)}"


# --------------------------------------------------------------------------- formatting
TIMING_KEYS = (("text_encode", "text encode"), ("denoise", "denoise"), ("decode", "decode"))


def format_timings(result: VideoResult) -> str:
    """A Markdown table of one video's timings."""
    head = "| | " + " | ".join(label for _, label in TIMING_KEYS) + " | total |"
    sep = "|---" * (len(TIMING_KEYS) + 2) + "|"
    return "\n".join([head, sep, _timing_row(result.setup, result)])


def format_compare(result: CompareResult) -> str:
    """Both timings and the speedup, as Markdown."""
    head = "| | " + " | ".join(label for _, label in TIMING_KEYS) + " | total |"
    sep = "|---" * (len(TIMING_KEYS) + 2) + "|"
    rows = [
        _timing_row(f"teacher ({result.teacher.setup})", result.teacher),
        _timing_row(f"student ({result.student.setup})", result.student),
    ]
    speed = (
        f"**Speedup (teacher time / student time): {result.speedup:.1f}x** end to end, "
        f"{result.denoise_speedup:.1f}x in denoising (same prompt, seed {result.student.seed}, "
        f"{result.student.width}x{result.student.height}, {result.student.num_frames} frames)"
    )
    return "\n".join([head, sep, *rows, "", speed])


def _timing_row(name: str, result: VideoResult) -> str:
    cells = [f"{result.timings[key]:.2f} s" for key, _ in TIMING_KEYS]
    return f"| {name} | " + " | ".join(cells) + f" | {result.timings['total']:.2f} s |"


# --------------------------------------------------------------------------- gradio adapters
def _error_message(err: BaseException) -> str:
    """What the user reads for ``err``: the message of a refused input (ValueError) or of a
    failed write or read (OSError, e.g. ``save_video``'s "cannot write video ...: disk
    full") as it is; anything else as an internal error, its traceback in the server log."""
    if isinstance(err, (ValueError, OSError)):
        return str(err) or type(err).__name__
    # Unexpected (out of memory, a bug): the page says what, the server log has the trace.
    traceback.print_exception(err, file=sys.stderr)
    return f"internal error ({type(err).__name__}): {err}"


def _user_error(err: BaseException) -> Exception:
    """``err`` as a ``gr.Error``: the call's error for API clients (plain text), a toast in
    the page (which Gradio sanitizes before rendering: a message quoting what was sent
    cannot inject markup that runs)."""
    import gradio as gr

    return gr.Error(_error_message(err), print_exception=False)


def _progress_callback(progress: Any, label: str) -> Callable[[dict], None] | None:
    if progress is None:
        return None

    def on_step(info: dict) -> None:
        progress((info["i"] + 1, info["total"]), desc=label, unit="step")

    return on_step


def uploaded_image(value: Any, field: str = "image") -> Path | None:
    """The image the page or an API client sent as ``field`` (Gradio's file payload
    ``{"path": ...}`` or its path): the upload's path, which must lie in Gradio's upload
    folder (no other file is read); ``None`` when there is none."""
    from gradio.utils import get_upload_folder

    if value is None or value == "":
        return None
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise ValueError(f"{field} must be an uploaded image file, got {_shown(value)}")
    root = Path(get_upload_folder()).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(
            f"{field}: not an uploaded file; upload the image (the UI reads only its own uploads)"
        )
    return resolved


def run_generate(ui: FastWanUI, *values: Any, progress: Any = None, **lora: Any) -> tuple:
    """Event adapter of Generate (``lora`` / ``lora_scale`` by name): ``(video path, seed
    used, timings, status)``; any failure is raised as a ``gr.Error`` carrying the message
    (what to fix); the server lives."""
    try:
        res = ui.generate(*values, callback=_progress_callback(progress, "denoising"), **lora)
    except Exception as err:  # noqa: BLE001 - any failure becomes a message; the server lives
        raise _user_error(err) from err
    return _generated(res)


def run_image_to_video(
    ui: FastWanUI,
    image: Any,
    *values: Any,
    progress: Any = None,
    last_image: Any = None,
    **lora: Any,
) -> tuple:
    """Event adapter of Image to video (``image`` and ``last_image``: uploads,
    :func:`uploaded_image`; then Generate's values): what :func:`run_generate` returns."""
    try:
        callback = _progress_callback(progress, "denoising")
        res = ui.image_to_video(
            uploaded_image(image),
            *values,
            callback=callback,
            last_image=uploaded_image(last_image, "last_image"),
            **lora,
        )
    except Exception as err:  # noqa: BLE001
        raise _user_error(err) from err
    return _generated(res)


def _generated(res: VideoResult) -> tuple:
    status = (
        f"Generated {res.num_frames} frames at {res.width}x{res.height} "
        f"in {res.timings['total']:.2f} s ({res.setup})."
    )
    return str(res.path), res.seed, format_timings(res), status


def run_compare(
    ui: FastWanUI,
    *values: Any,
    progress: Any = None,
    image: Any = None,
    last_image: Any = None,
    **lora: Any,
) -> tuple:
    """Event adapter of Compare: ``(teacher video, student video, seed used, table, status)``;
    a failure is a ``gr.Error`` as in :func:`run_generate`."""
    try:
        callback = _progress_callback(progress, "denoising")
        res = ui.compare(
            *values,
            callback=callback,
            image=uploaded_image(image),
            last_image=uploaded_image(last_image, "last_image"),
            **lora,
        )
    except Exception as err:  # noqa: BLE001
        raise _user_error(err) from err
    pace = (
        f"{res.speedup:.1f}x faster"
        if res.speedup >= 1
        else f"{1 / max(res.speedup, 1e-9):.1f}x slower"
    )
    status = f"Compared at {res.student.width}x{res.student.height}: the student is {pace}."
    return (
        str(res.teacher.path),
        str(res.student.path),
        res.student.seed,
        format_compare(res),
        status,
    )


GENERATE_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "attention",
    "sparsity",
    "resolution",
    "num_frames",
)  # the inputs of Generate, in the page's and the API's order
LORA_FIELDS = ("lora", "lora_scale")  # after them, when the UI was started with LoRAs


def _event_handler(
    name: str,
    names: Sequence[str],
    run: Callable[[dict[str, Any], Any], Any],
    errors: _LastErrors,
    tracker: Any,
) -> Callable:
    """A Gradio event function taking the inputs ``names`` (what the API lists, in order)
    and calling ``run(values by name, progress)``; its ``gr.Error`` is also recorded for
    the status line. Gradio reads the signature: each input by name, then the request (by
    annotation) and the progress tracker (by default), inserted after the inputs."""
    import inspect

    import gradio as gr

    n = len(names)

    def handler(*args: Any) -> Any:
        values = dict(zip(names, args[:n]))
        request = args[n] if len(args) > n else None
        progress = args[n + 1] if len(args) > n + 1 else None
        try:
            return run(values, progress)
        except gr.Error as err:
            errors.put(getattr(request, "session_hash", None), err.message)
            raise

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(name, kind) for name in names]
    params += [
        inspect.Parameter("request", kind, default=None),
        inspect.Parameter("progress", kind, default=tracker),
    ]
    handler.__name__ = handler.__qualname__ = name
    handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    handler.__annotations__ = {"request": gr.Request}
    return handler


class _LastErrors:
    """The last error message of each page session, for the status line: the handler that
    failed records it, the page's failure event reads it back. Bounded: API clients never
    read theirs."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._messages: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, session: str | None, message: str) -> None:
        with self._lock:
            self._messages[session or ""] = message
            self._messages.move_to_end(session or "")
            while len(self._messages) > self._size:
                self._messages.popitem(last=False)

    def pop(self, session: str | None) -> str | None:
        with self._lock:
            return self._messages.pop(session or "", None)


def build_app(ui: FastWanUI, *, queue_size: int = 16) -> gr.Blocks:
    """The Gradio page: controls, outputs, compare tab, a queue of ``queue_size`` waiting
    requests served one at a time. Analytics off (no network); launch it with
    :func:`launch` or ``app.launch(server_name="127.0.0.1", ...)``."""
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
    # Gradio reads this when it sends usage data or checks its version: set before use.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    model = ui.student_model
    opts = ui.options
    lo, hi, default_steps = step_range(model)
    mode, sparsity = ui.default_attention
    teacher_note = "" if ui.teacher is not None else f"\n\n*{ui.teacher_unavailable}*"
    takes_image = ui.takes_image
    takes_last = ui.takes_last_image
    image_names = ["image", "last_image"] if takes_last else ["image"]

    with gr.Blocks(title="fastwan", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        kind = "few-step DMD" if model.preset.few_step else "multi-step"
        gr.Markdown(
            f"# fastwan\n{'Text and image' if takes_image else 'Text'} to video with "
            f"`{model.preset.name}` ({kind}; by default "
            f"{_setup(mode, sparsity, sampling_args(model, None))})."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                negative = gr.Textbox(
                    label="Negative prompt (empty: the model's default; used with CFG)",
                    lines=2,
                    elem_id="negative-prompt",
                )
                with gr.Row():
                    # Text, not a number field: a browser's numbers lose digits past 2**53.
                    seed = gr.Textbox(
                        label=f"Seed (0 to {MAX_SEED})",
                        value="0",
                        max_lines=1,
                        elem_id="seed",
                    )
                    dice = gr.Button("Random seed", elem_id="random-seed", scale=0)
                steps_info = (
                    "DMD: the first N of the timesteps "
                    + ", ".join(f"{t:g}" for t in model.preset.timesteps)
                    if model.preset.few_step
                    else "sampler steps"
                )
                steps = gr.Slider(
                    lo,
                    hi,
                    value=default_steps,
                    step=1,
                    label="Steps",
                    info=steps_info,
                    elem_id="steps",
                )
                with gr.Row():
                    attention = gr.Radio(
                        list(ATTENTION_CHOICES),
                        value=mode,
                        label="Attention",
                        elem_id="attention",
                    )
                    sparsity_in = gr.Slider(
                        0.0,
                        0.95,
                        value=sparsity,
                        step=0.05,
                        label="VSA sparsity",
                        elem_id="sparsity",
                    )
                with gr.Row():
                    resolution = gr.Dropdown(
                        opts.resolution_labels,
                        value=resolution_label(*opts.default_resolution),
                        label="Resolution (width x height)",
                        elem_id="resolution",
                    )
                    frames = gr.Dropdown(  # text choices: what the API declares is taken
                        opts.frame_labels,
                        value=str(opts.default_frames),
                        label="Frames",
                        elem_id="frames",
                    )
                lora_in = lora_scale_in = None
                if ui.lora_defaults:
                    first, first_scale = next(iter(ui.lora_defaults.items()))
                    with gr.Row():
                        lora_in = gr.Dropdown(
                            ["none", *ui.lora_defaults],
                            value=first,
                            label="LoRA (the student's; the teacher runs without)",
                            elem_id="lora",
                        )
                        lora_scale_in = gr.Slider(
                            0.0,
                            MAX_LORA_SCALE,
                            value=first_scale,
                            step=0.05,
                            label="LoRA scale",
                            elem_id="lora-scale",
                        )
                gr.Examples([[e] for e in ui.examples], inputs=[prompt], label="Example prompts")
            with gr.Column(scale=1):
                # Wan2.1 I2V needs an image: no text-to-video tab (its API says so if called)
                with gr.Tab("Generate", visible=model.task != "i2v"):
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    video = gr.Video(label="Video", interactive=False, elem_id="video")
                    timings = gr.Markdown(elem_id="timings")
                if takes_image:
                    with gr.Tab("Image to video"):
                        gr.Markdown(
                            "The video starts from the uploaded image; uploading one sets the "
                            "resolution to the offered size nearest its aspect ratio."
                        )
                        image = gr.Image(
                            label="First frame", type="filepath", sources=["upload"],
                            elem_id="image",
                        )  # fmt: skip
                        last_image = None
                        if takes_last:  # a first-last-frame model needs both ends
                            last_image = gr.Image(
                                label="Last frame", type="filepath", sources=["upload"],
                                elem_id="last-image",
                            )  # fmt: skip
                        image_btn = gr.Button(
                            "Generate from image", variant="primary", elem_id="generate-image"
                        )
                        image_video = gr.Video(
                            label="Video", interactive=False, elem_id="image-video"
                        )
                        image_timings = gr.Markdown(elem_id="image-timings")
                with gr.Tab("Compare teacher vs student"):
                    gr.Markdown(
                        "The teacher (its own sampler and dense attention) and the student "
                        "run the same prompt and seed." + teacher_note
                    )
                    teacher_steps = gr.Number(
                        label="Teacher steps (0: the teacher's default)",
                        value=0,
                        precision=0,
                        minimum=0,
                        maximum=1000,
                        elem_id="teacher-steps",
                    )
                    compare_image = compare_last = None
                    if takes_image:
                        compare_image = gr.Image(
                            label="First frame (optional: compare image to video)",
                            type="filepath", sources=["upload"], elem_id="compare-image",
                        )  # fmt: skip
                    if takes_last:
                        compare_last = gr.Image(
                            label="Last frame (with the first frame)",
                            type="filepath", sources=["upload"], elem_id="compare-last-image",
                        )  # fmt: skip
                    compare_btn = gr.Button("Compare", variant="primary", elem_id="compare")
                    with gr.Row():
                        teacher_video = gr.Video(
                            label="Teacher", interactive=False, elem_id="teacher-video"
                        )
                        student_video = gr.Video(
                            label="Student", interactive=False, elem_id="student-video"
                        )
                    compare_table = gr.Markdown(elem_id="compare-timings")
                seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
                status = gr.Markdown(elem_id="status")

        common = [prompt, negative, seed, steps]
        tail = [attention, sparsity_in, resolution, frames]
        if lora_in is not None:
            tail += [lora_in, lora_scale_in]
        gen_names = [*GENERATE_FIELDS, *ui.lora_fields]
        compare_names = [*GENERATE_FIELDS[:4], "teacher_steps", *GENERATE_FIELDS[4:]]
        compare_names += [*ui.lora_fields, *(image_names if takes_image else [])]

        tracker = gr.Progress()  # Gradio hands a live one to a handler defaulting to it
        errors = _LastErrors()

        def lora_kwargs(v: dict) -> dict:
            return {k: v[k] for k in ui.lora_fields}

        def gen_values(v: dict) -> list:
            return [v[k] for k in GENERATE_FIELDS]

        on_generate = _event_handler(
            "on_generate",
            gen_names,
            lambda v, p: run_generate(ui, *gen_values(v), progress=p, **lora_kwargs(v)),
            errors,
            tracker,
        )
        on_image_to_video = _event_handler(
            "on_image_to_video",
            [*image_names, *gen_names],
            lambda v, p: run_image_to_video(
                ui,
                v["image"],
                *gen_values(v),
                progress=p,
                last_image=v.get("last_image"),
                **lora_kwargs(v),
            ),
            errors,
            tracker,
        )
        on_compare = _event_handler(
            "on_compare",
            compare_names,
            lambda v, p: run_compare(
                ui,
                *[v[k] for k in compare_names[:9]],
                progress=p,
                image=v.get("image"),
                last_image=v.get("last_image"),
                **lora_kwargs(v),
            ),
            errors,
            tracker,
        )

        def on_image_upload(image):
            """An uploaded image sets the resolution to the offered size of its aspect."""
            try:
                return ui.resolution_for_image(uploaded_image(image))
            except Exception as err:  # noqa: BLE001
                raise _user_error(err) from err

        def failure_handler(blank: tuple) -> Callable:
            def on_failure(request=None):
                """After a failed request: its message in the status line as well, and the
                outputs of the previous one cleared (they are not this request's)."""
                message = errors.pop(getattr(request, "session_hash", None))
                return (*blank, f"**Error:** {message or 'see the message above'}")

            return on_failure

        on_generate_failure = failure_handler((None, "", ""))
        on_compare_failure = failure_handler((None, None, "", ""))
        # Gradio finds gr.Request by annotation; this module's annotations are strings.
        for fn in (on_generate_failure, on_compare_failure):
            fn.__annotations__["request"] = gr.Request

        # One worker for every button: requests queue instead of running side by side.
        # preprocess=False: the handlers get the values as sent and check each one, so a bad
        # value is a message naming its field, not Gradio's generic error.
        def wire(button, fn, inputs, outputs, on_failure, api_name):
            button.click(
                fn,
                inputs=inputs,
                outputs=outputs,
                concurrency_limit=1,
                concurrency_id="model",
                preprocess=False,
                api_name=api_name,
            ).failure(on_failure, outputs=outputs, queue=False, api_visibility="private")

        generate_out = [video, seed_used, timings, status]
        wire(
            generate_btn, on_generate, common + tail, generate_out, on_generate_failure, "generate"
        )
        compare_images = [c for c in (compare_image, compare_last) if c is not None]
        compare_in = common + [teacher_steps] + tail + compare_images
        compare_out = [teacher_video, student_video, seed_used, compare_table, status]
        wire(compare_btn, on_compare, compare_in, compare_out, on_compare_failure, "compare")
        if takes_image:
            image_out = [image_video, seed_used, image_timings, status]
            image_in = [c for c in (image, last_image) if c is not None] + common + tail
            on_failure = on_generate_failure
            wire(image_btn, on_image_to_video, image_in, image_out, on_failure, "image_to_video")
            for source in (image, compare_image):
                source.upload(
                    on_image_upload,
                    inputs=source,
                    outputs=resolution,
                    queue=False,
                    preprocess=False,
                    api_visibility="private",
                )
        dice.click(ui.random_seed, outputs=seed, queue=False, api_name="random_seed")
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    return app


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve ``app`` on ``host:port`` (loopback by default): no share link, no server-side
    rendering (no Node), system fonts only, so nothing reaches the network."""
    import gradio as gr

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        ssr_mode=False,
        mcp_server=False,
        quiet=not block,
        theme=theme,
    )
