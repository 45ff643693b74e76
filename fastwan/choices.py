"""Every closed choice list of fastwan, defined once (torch-free: the bottom of the import
graph). Configs, the CLI and the library all take their choices from here, so a new
backend or sampler is added in one place and appears in ``--help``, the recipe checks and
the errors alike.
"""

from __future__ import annotations

from typing import Any

# VSA kernels: auto = Triton on CUDA, else torch; reference = the dense float32 oracle.
ATTENTION_BACKENDS = ("auto", "reference", "torch", "triton", "flex")
# Other projects' VSA kernels that `fastwan bench attention --peer` times beside fastwan's.
ATTENTION_PEERS = ("fastvideo",)
# What a model generates from: text (t2v), text + a first image through CLIP and condition
# channels (i2v: Wan2.1 I2V, WanImageToVideoPipeline), or text with an optional first image
# as the clean first latent frame (ti2v: Wan2.2 TI2V, expand_timesteps).
TASKS = ("t2v", "i2v", "ti2v")
# What a transformer's self-attention runs.
ATTENTION_KINDS = ("vsa", "dense")
# torch.compile backends that fastwan's regional compile is tested with.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# Activation checkpointing of the blocks: full recomputes all; selective keeps the attention
# kernels' outputs (the costly part to recompute).
CHECKPOINT_MODES = ("none", "selective", "full")
# Inference samplers: dmd = the few-step DMD schedule, scheduler = the folder's own
# diffusers scheduler, unipc = diffusers' UniPC multistep, euler = flow-matching Euler.
SAMPLERS = ("dmd", "euler", "unipc", "scheduler")
# Samplers for many-step validation videos during fine-tuning (no DMD schedule there).
VALIDATION_SAMPLERS = ("scheduler", "unipc", "euler")
# Training methods, and the CLI command that runs each.
METHODS = ("dmd", "flow")
METHOD_OF_COMMAND = {"distill": "dmd", "finetune": "flow"}
# LoRA (recipe section lora): how an adapter's A matrix starts (B starts at zero, so the
# adapted network starts as its base): default = peft's kaiming-uniform, gaussian = N(0, 1/r).
LORA_INITS = ("default", "gaussian")
# How a LoRA student trains its VSA gates: full = the gate weights themselves, lora = a
# low-rank adapter on each gate (the gate's base stays frozen).
LORA_GATES = ("full", "lora")
# The embedded toy world's shipped models (fastwan/toy/weights/toy-<role>, each also a
# preset): the text-to-video teacher and its 3-step VSA student, and the image-to-video pair.
TOY_ROLES = ("teacher", "student", "i2v-teacher", "i2v-student")
# VideoGenerator.generate(output_type=...): as diffusers' WanPipeline names them.
OUTPUT_TYPES = ("np", "pil", "pt", "latent")
# Video writers of fastwan.video_io.
VIDEO_BACKENDS = ("auto", "imageio-ffmpeg", "pyav")
# Jobs of ``fastwan serve``: waiting, generating, and the finished states (expired: a
# finished job past the server's --ttl, its video deleted).
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
# Image files a `fastwan serve` request may carry (PIL format names).
REQUEST_IMAGE_FORMATS = ("PNG", "JPEG")
# torch generators take 64-bit seeds.
MAX_SEED = 2**63 - 1

# dtype names: the short ones recipes use, and torch's own spelling.
DTYPE_ALIASES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
# The dtypes a recipe's training precision takes (fp16 trains only with a loss scaler).
TRAIN_DTYPES = ("fp32", "bf16")
# The dtypes inference and data tools take.
DTYPES = ("fp32", "bf16", "fp16")


def parse_dtype(dtype: Any, allowed: tuple[str, ...] = DTYPES, field: str = "dtype") -> Any:
    """``torch.bfloat16`` or a name (``bf16`` / ``bfloat16`` ...) -> the ``torch.dtype``;
    anything else, or a dtype outside ``allowed``, is a ``ValueError`` naming ``field``.
    torch is imported here, not at module import (this module stays torch-free)."""
    import torch

    canon = {DTYPE_ALIASES[a] for a in allowed}
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
        if name in canon:
            return dtype
    elif isinstance(dtype, str) and DTYPE_ALIASES.get(dtype.lower()) in canon:
        return getattr(torch, DTYPE_ALIASES[dtype.lower()])
    raise ValueError(f"{field} must be one of {', '.join(allowed)}, got {dtype!r}")


def check_choice(value: Any, choices: tuple[str, ...], field: str) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming the field."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(choices)}, got {value!r}")
    return value
