"""The HTTP API's request and response bodies (pydantic): every field typed and bounded.

:class:`VideoRequest` is strict (``"16"`` is not a height, ``true`` is not a seed) and
refuses unknown fields, so a misspelt option is a 422 naming it instead of being ignored.
Its fields are the keyword arguments of ``VideoGenerator.generate`` that a client may set
(:meth:`VideoRequest.generate_kwargs`), plus the attention setting the worker applies
before generating. Image or LoRA options are added as further optional fields: a field
here, its bound, its entry in ``generate_kwargs``; the job store keeps the request as JSON,
so no table changes. An image must arrive as data (base64) and reach ``generate`` decoded:
``generate(image=...)`` also takes a file path, and no path from a request is ever opened.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fastwan.choices import ATTENTION_KINDS, JOB_STATES, MAX_SEED, REQUEST_IMAGE_FORMATS

MAX_PROMPT_CHARS = 4000
# Generous static bounds: the model's own limits (VAE stride, patch, rotary table) are
# checked by VideoGenerator.check_inputs before a job is queued.
MAX_SIDE = 4096
MAX_FRAMES = 1024
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_IMAGE_BYTES = 8 * 1024 * 1024  # one image file (PNG / JPEG), decoded from base64
MAX_IMAGE_CHARS = 4 * ((MAX_IMAGE_BYTES + 2) // 3) + 64  # its base64 (+ a data: URL prefix)
MAX_LORA_SCALE = 10.0
# Names of registered LoRA adapters (--lora NAME=PATH): no dots (peft's adapter names).
LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg);base64,", re.IGNORECASE)

# Literal[tuple] is Literal of its items: the lists stay defined once, in fastwan.choices.
JobStatus = Literal[JOB_STATES]
Attention = Literal[ATTENTION_KINDS]


class VideoRequest(BaseModel):
    """``POST /v1/videos``: one video job (text-to-video, or image-to-video with ``image``
    on a model that takes one). Omitted fields take the model's defaults (its preset:
    size, frames, steps or DMD timesteps, guidance, attention; no LoRA)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to show")
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="used with CFG (guidance_scale > 1)"
    )
    height: int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels")
    width: int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels")
    num_frames: int | None = Field(None, ge=1, le=MAX_FRAMES)
    num_inference_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="multi-step sampling with this many steps (default: the model's way: "
        "few-step DMD for FastWan students)",
    )
    guidance_scale: float | None = Field(
        None, gt=0, le=MAX_GUIDANCE, allow_inf_nan=False, description="> 1 runs CFG"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    attention: Attention | None = Field(None, description="default: the model's")
    sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, allow_inf_nan=False, description="VSA: key tiles skipped"
    )
    image: str | None = Field(
        None,
        max_length=MAX_IMAGE_CHARS,
        description="first frame, image-to-video models only: a PNG or JPEG file as base64 "
        f"(or a data:image/png;base64,... URL), at most {MAX_IMAGE_BYTES // 2**20} MiB; "
        "the size then defaults to the image's aspect ratio",
    )
    last_image: str | None = Field(
        None,
        max_length=MAX_IMAGE_CHARS,
        description="last frame (as image), first-last-frame models (Wan2.1 FLF2V) only",
    )
    lora: str | None = Field(
        None,
        pattern=LORA_NAME,
        description="a LoRA adapter the server registered (--lora NAME=PATH), by name; "
        "default: none (the base model)",
    )
    lora_scale: float | None = Field(
        None,
        ge=0.0,
        le=MAX_LORA_SCALE,
        allow_inf_nan=False,
        description="the adapter's strength (1 = as trained; default: its --lora scale)",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank: say what the video should show")
        return value

    @field_validator("sparsity")
    @classmethod
    def _sparsity_needs_vsa(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("attention") == "dense":
            raise ValueError("sparsity applies to attention 'vsa'; drop it or pass attention 'vsa'")
        return value

    @field_validator("last_image")
    @classmethod
    def _last_needs_first(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("image") is None:
            raise ValueError("last_image needs image (the first frame)")
        return value

    @field_validator("lora_scale")
    @classmethod
    def _scale_needs_lora(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("lora") is None:
            raise ValueError("lora_scale applies to an adapter: pass lora NAME too, or drop it")
        return value

    def generate_kwargs(self) -> dict[str, Any]:
        """The ``VideoGenerator.generate`` keyword arguments of this request (no callback),
        images decoded: a ValueError naming ``image`` / ``last_image`` when one is not a
        PNG / JPEG within bounds."""
        from fastwan.inputs import generate_kwargs

        values = {
            name: getattr(self, name)
            for name in (
                "prompt",
                "negative_prompt",
                "height",
                "width",
                "num_frames",
                "num_inference_steps",
                "guidance_scale",
                "seed",
            )
        }
        for name in ("image", "last_image"):
            text = getattr(self, name)
            values[name] = decode_image(text, name) if text is not None else None
        return generate_kwargs(values)


def image_bytes(text: str, field: str) -> bytes:
    """The file bytes of a base64 image field (a ``data:image/...;base64,`` prefix is
    allowed), or a ValueError naming ``field``."""
    body = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{field} is not valid base64: send the PNG / JPEG file's bytes base64-encoded "
            "(e.g. base64 -w0 frame.png)"
        ) from None
    if not data:
        raise ValueError(f"{field} is empty: send a PNG or JPEG file, base64-encoded")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(
            f"{field} is {len(data)} bytes, over {MAX_IMAGE_BYTES} ({MAX_IMAGE_BYTES // 2**20} "
            "MiB): send a smaller PNG / JPEG (the video's size is at most a few megapixels)"
        )
    return data


def open_image(data: bytes, field: str) -> Any:
    """A PIL image of ``data`` opened lazily (header read, pixels not decoded yet) after
    the format and size checks, or a ValueError naming ``field``."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=list(REQUEST_IMAGE_FORMATS))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ValueError(
            f"{field} is not a PNG or JPEG image ({'/'.join(REQUEST_IMAGE_FORMATS)} only)"
        ) from None
    width, height = img.size
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(
            f"{field} is {width}x{height}; images may be at most {MAX_SIDE} pixels a side"
        )
    return img


def decode_image(text: str, field: str) -> Any:
    """The RGB PIL image of a base64 PNG / JPEG field, or a ValueError naming ``field``:
    bad base64, over :data:`MAX_IMAGE_BYTES`, another format, over :data:`MAX_SIDE` a
    side (checked from the header, before the pixels are decoded), a truncated file."""
    img = open_image(image_bytes(text, field), field)
    try:
        with img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # truncated / corrupt pixel data
        raise ValueError(f"{field}: the image data is damaged ({err})") from None


class ImageInfo(BaseModel):
    """An image of a request as job views show it (not its bytes)."""

    format: str = Field(description="PNG or JPEG")
    width: int
    height: int
    bytes: int
    sha256: str


@functools.lru_cache(maxsize=256)
def image_info(text: str) -> ImageInfo:
    """:class:`ImageInfo` of a base64 image field already accepted (cached: job views are
    polled)."""
    data = image_bytes(text, "image")
    img = open_image(data, "image")
    return ImageInfo(
        format=img.format,
        width=img.width,
        height=img.height,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


class RequestView(VideoRequest):
    """A job's request as ``GET /v1/videos/{id}`` shows it: the images as their
    :class:`ImageInfo`."""

    model_config = ConfigDict(extra="forbid", strict=False)

    image: ImageInfo | None = None  # type: ignore[assignment]
    last_image: ImageInfo | None = None  # type: ignore[assignment]

    @classmethod
    def of(cls, request: VideoRequest) -> RequestView:
        data = request.model_dump()
        for name in ("image", "last_image"):
            if data[name] is not None:
                data[name] = image_info(data[name])
        return cls.model_validate(data)


class Progress(BaseModel):
    step: int = Field(description="denoising steps done")
    total: int = Field(description="denoising steps of the job")


class Job(BaseModel):
    """A job as ``GET /v1/videos/{id}`` shows it."""

    id: str
    object: Literal["video"] = "video"
    status: JobStatus
    progress: Progress
    queue_position: int | None = Field(None, description="jobs ahead of it (queued only)")
    created_at: float = Field(description="Unix seconds")
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="when the result is deleted")
    attention: Attention
    sparsity: float | None
    request: RequestView
    timings: dict[str, float] | None = Field(
        None, description="seconds: text_encode, denoise, decode, total"
    )
    error: str | None = None
    content_url: str | None = Field(None, description="the MP4, once succeeded")


class WorkerInfo(BaseModel):
    name: str
    device: str
    alive: bool
    job: str | None = Field(None, description="the job it runs")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    task: str = Field(description="t2v, or i2v / ti2v: the model takes an image")
    loras: list[str] = Field(description="adapters a request may name as lora")
    workers: list[WorkerInfo]
    queue_depth: int
    queue_capacity: int
