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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fastwan.choices import ATTENTION_KINDS, JOB_STATES, MAX_SEED

MAX_PROMPT_CHARS = 4000
# Generous static bounds: the model's own limits (VAE stride, patch, rotary table) are
# checked by VideoGenerator.check_inputs before a job is queued.
MAX_SIDE = 4096
MAX_FRAMES = 1024
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0

# Literal[tuple] is Literal of its items: the lists stay defined once, in fastwan.choices.
JobStatus = Literal[JOB_STATES]
Attention = Literal[ATTENTION_KINDS]


class VideoRequest(BaseModel):
    """``POST /v1/videos``: one text-to-video job. Omitted fields take the model's
    defaults (its preset: size, frames, steps or DMD timesteps, guidance, attention)."""

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

    def generate_kwargs(self) -> dict[str, Any]:
        """The ``VideoGenerator.generate`` keyword arguments of this request (no callback)."""
        return dict(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            height=self.height,
            width=self.width,
            num_frames=self.num_frames,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
        )


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
    request: VideoRequest
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
    workers: list[WorkerInfo]
    queue_depth: int
    queue_capacity: int
