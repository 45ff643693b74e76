"""The parquet schema of fastwan datasets, compatible with FastVideo's published datasets.

Every row is one training sample. Tensors are stored as three columns
``<name>_bytes`` (raw little-endian bytes), ``<name>_shape`` (list of ints) and
``<name>_dtype`` (``"float32"``, ``"bfloat16"``, ...), as in FastVideo's
``pyarrow_schema_t2v`` (e.g. ``FastVideo/Wan-Syn_77x448x832_600k``).

Four kinds of shard:

* ``video``: ``id``, ``vae_latent_*`` (the VAE posterior mean, *unnormalised*, float32
  ``[C, T, H, W]``), ``text_embedding_*`` (the valid tokens only, ``[L, dim]``),
  ``file_name``, ``caption``, ``media_type``, ``width``, ``height``, ``num_frames``,
  ``duration_sec``, ``fps``.
* ``text``: ``id``, ``text_embedding_*``, ``caption``, ``media_type`` (data-free
  distillation). FastVideo's text-only shards lack ``media_type``; readers accept that.
* ``i2v``: the ``video`` columns plus FastVideo's ``pyarrow_schema_i2v`` image condition,
  in its column order after the text embedding: ``clip_feature_*`` (the CLIP vision
  encoder's last hidden state ``[N, D]``, e.g. ``[257, 1280]`` for Wan2.1 I2V; absent for
  Wan2.2 TI2V), ``first_frame_latent_*`` (the VAE mean of the first frame followed by
  zero frames, ``[C, T, H, W]``, *normalised* as FastVideo writes it: ``(mean - latents_mean)
  / latents_std``; for Wan2.2 TI2V, whose condition is the clean first latent frame, the
  image's latent alone, ``[C, 1, H, W]``) and ``pil_image_*`` (the conditioning frame
  ``[H, W, 3]`` uint8, for validation). A tensor that a row does not have is written as
  FastVideo does: empty bytes, shape ``[]`` and dtype ``""``.
* ``i2v_text``: text-only image-to-video data (data-free distillation of an image-to-video
  model, which needs an image per prompt): the ``text`` columns with the ``i2v`` image
  condition after the text embedding, plus ``file_name`` (the image), ``width``, ``height``
  and ``num_frames`` (the clip size the condition was computed for). FastVideo has no such
  schema; its readers of text-only data read the text columns and ignore the rest.

Optional extra column: ``generation_settings`` (a JSON string: how a synthetic sample was
generated). FastVideo's readers ignore columns they do not know.

This module is the one place the schema is defined; :func:`validate_schema` checks a file's
schema and names the missing column or the column of the wrong type.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

__all__ = [
    "ColumnSpec",
    "DatasetKind",
    "SchemaError",
    "TENSOR_DTYPES",
    "TEXT_COLUMNS",
    "VIDEO_COLUMNS",
    "I2V_COLUMNS",
    "I2V_TEXT_COLUMNS",
    "i2v_row",
    "i2v_text_row",
    "is_absent",
    "arrow_schema",
    "columns_for",
    "decode_tensor",
    "detect_kind",
    "encode_tensor",
    "text_row",
    "validate_row",
    "validate_schema",
    "video_row",
]

DatasetKind = Literal["video", "text", "i2v", "i2v_text"]

# Column type families a reader accepts for each logical type (writers use the first).
_FAMILIES = {
    "string": "string",
    "binary": "binary",
    "int": "integer",
    "float": "floating-point number",
    "shape": "list of integers",
}


@dataclass(frozen=True)
class ColumnSpec:
    """One column: its name, logical type and whether readers require it."""

    name: str
    kind: Literal["string", "binary", "int", "float", "shape"]
    required: bool = True  # for readers; writers always write every column

    def arrow_type(self) -> pa.DataType:
        return {
            "string": pa.string(),
            "binary": pa.binary(),
            "int": pa.int64(),
            "float": pa.float64(),
            "shape": pa.list_(pa.int64()),
        }[self.kind]

    def accepts(self, dtype: pa.DataType) -> bool:
        """Whether a file's column type is compatible (e.g. large_string for string)."""
        t = pa.types
        if self.kind == "string":
            return t.is_string(dtype) or t.is_large_string(dtype)
        if self.kind == "binary":
            return t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_fixed_size_binary(dtype)
        if self.kind == "int":
            return t.is_integer(dtype)
        if self.kind == "float":
            return t.is_floating(dtype) or t.is_integer(dtype)
        # shape: a list of integers
        return (
            t.is_list(dtype) or t.is_large_list(dtype) or t.is_fixed_size_list(dtype)
        ) and t.is_integer(dtype.value_type)


def _tensor_columns(prefix: str) -> list[ColumnSpec]:
    return [
        ColumnSpec(f"{prefix}_bytes", "binary"),
        ColumnSpec(f"{prefix}_shape", "shape"),
        ColumnSpec(f"{prefix}_dtype", "string"),
    ]


# FastVideo's pyarrow_schema_t2v, in its column order.
VIDEO_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("id", "string"),
    *_tensor_columns("vae_latent"),
    *_tensor_columns("text_embedding"),
    ColumnSpec("file_name", "string", required=False),
    ColumnSpec("caption", "string"),
    ColumnSpec("media_type", "string", required=False),
    ColumnSpec("width", "int", required=False),
    ColumnSpec("height", "int", required=False),
    ColumnSpec("num_frames", "int", required=False),
    ColumnSpec("duration_sec", "float", required=False),
    ColumnSpec("fps", "float", required=False),
)

# FastVideo's pyarrow_schema_text_only plus media_type ("text").
TEXT_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("id", "string"),
    *_tensor_columns("text_embedding"),
    ColumnSpec("caption", "string"),
    ColumnSpec("media_type", "string", required=False),
)

# FastVideo's pyarrow_schema_i2v: the video columns with the image condition after the text.
I2V_COLUMNS: tuple[ColumnSpec, ...] = (
    *VIDEO_COLUMNS[:7],
    *_tensor_columns("clip_feature"),
    *_tensor_columns("first_frame_latent"),
    *_tensor_columns("pil_image"),
    *VIDEO_COLUMNS[7:],
)
# The tensors of an i2v row that may be absent (empty bytes, shape [], dtype "").
I2V_TENSORS = ("clip_feature", "first_frame_latent", "pil_image")

# Text-only image-to-video rows: a prompt, its image's condition and the clip size it is for.
I2V_TEXT_COLUMNS: tuple[ColumnSpec, ...] = (
    *TEXT_COLUMNS[:4],  # id, text_embedding_*
    *_tensor_columns("clip_feature"),
    *_tensor_columns("first_frame_latent"),
    *_tensor_columns("pil_image"),
    ColumnSpec("file_name", "string", required=False),
    ColumnSpec("caption", "string"),
    ColumnSpec("media_type", "string", required=False),
    ColumnSpec("width", "int", required=False),
    ColumnSpec("height", "int", required=False),
    ColumnSpec("num_frames", "int", required=False),
)

# Optional extras: type-checked when present, never required.
EXTRA_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("generation_settings", "string", required=False),
)

# Tensor dtypes the readers decode (FastVideo writes str(numpy dtype): "float32", ...).
TENSOR_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "uint8": torch.uint8,  # pil_image
}


class SchemaError(ValueError):
    """A parquet file or row that does not follow the schema; the message names the file,
    the column (and the row) and says how to fix it.

    ``reason``: a short category that readers count skipped rows under -- ``decode_error``
    (unreadable, truncated or mislabelled), ``non_finite`` (NaN, inf or absurdly large
    values), ``shape_mismatch`` / ``too_short`` (latents of another clip size)."""

    def __init__(self, message: str, reason: str = "decode_error") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keeps ``reason`` across DataLoader worker processes
        return (type(self), (str(self), self.reason))


def columns_for(kind: DatasetKind) -> tuple[ColumnSpec, ...]:
    if kind == "video":
        return VIDEO_COLUMNS
    if kind == "text":
        return TEXT_COLUMNS
    if kind == "i2v":
        return I2V_COLUMNS
    if kind == "i2v_text":
        return I2V_TEXT_COLUMNS
    raise ValueError(f"dataset kind must be 'video', 'text', 'i2v' or 'i2v_text', got {kind!r}")


def arrow_schema(kind: DatasetKind, extra: Sequence[str] = ()) -> pa.Schema:
    """The schema fastwan writes for ``kind``, plus the named optional extra columns."""
    specs = list(columns_for(kind))
    known = {c.name: c for c in EXTRA_COLUMNS}
    for name in extra:
        if name not in known:
            raise ValueError(f"unknown extra column {name!r}; known: {sorted(known)}")
        specs.append(known[name])
    return pa.schema([pa.field(c.name, c.arrow_type()) for c in specs])


def detect_kind(schema: pa.Schema) -> DatasetKind:
    """``i2v`` when the file has VAE latents and an image condition, ``video`` when it has
    VAE latents, ``i2v_text`` when it has text embeddings and an image condition, ``text``
    when it has only text embeddings."""
    names = set(schema.names)
    if "vae_latent_bytes" in names:
        return "i2v" if "first_frame_latent_bytes" in names else "video"
    if "text_embedding_bytes" in names:
        return "i2v_text" if "first_frame_latent_bytes" in names else "text"
    raise SchemaError(
        "has neither vae_latent_bytes nor text_embedding_bytes: not a FastVideo/fastwan "
        f"latent dataset (columns: {sorted(names)}); write it with `fastwan preprocess`, "
        "`fastwan preprocess-text` or `fastwan synthesize`"
    )


def validate_schema(schema: pa.Schema, where: str, kind: DatasetKind | None = None) -> DatasetKind:
    """Check a file's schema; return its kind.

    ``kind``: the kind the caller needs (``text`` is satisfied by every shard: their text
    columns are read, the rest ignored; ``video`` by i2v shards, the image condition
    ignored; ``i2v_text`` -- text and image condition -- by i2v shards, the latents
    ignored); ``None`` accepts any. Raises :class:`SchemaError` naming ``where`` (the file)
    and the missing / mistyped column.
    """
    try:
        found = detect_kind(schema)
    except SchemaError as err:
        raise SchemaError(f"{where}: {err}") from None
    if kind in ("video", "i2v") and found in ("text", "i2v_text"):
        what = "text" if found == "text" else "text and image conditions"
        raise SchemaError(
            f"{where}: missing column 'vae_latent_bytes' (a text-only shard: it holds {what} "
            "but no video latents); use a dataset with latents, or set "
            "data.text_only: true for data-free distillation"
        )
    if kind == "i2v_text" and found in ("text", "video"):
        raise SchemaError(
            f"{where}: missing column 'first_frame_latent_bytes' (a {found} shard: it has no "
            "image condition); image_condition needs i2v shards: write text-only "
            "image-to-video shards with `fastwan preprocess-text --task i2v` (a prompts file "
            "with an image per prompt), or video ones with `fastwan preprocess --task i2v`"
        )
    if kind == "i2v" and found == "video":
        raise SchemaError(
            f"{where}: missing column 'first_frame_latent_bytes' (a text-to-video shard: it "
            "has no image condition); write image-to-video shards with `fastwan preprocess "
            "--task i2v` (FastVideo's pyarrow_schema_i2v)"
        )
    specs = columns_for("text" if kind == "text" else found) + EXTRA_COLUMNS
    for spec in specs:
        index = schema.get_field_index(spec.name)
        if index < 0:
            if spec.required:
                raise SchemaError(
                    f"{where}: missing column {spec.name!r} (a {found} shard needs "
                    f"{[c.name for c in columns_for(found) if c.required]}); rewrite the file "
                    "with FastVideo's schema (see fastwan.data.schema)"
                )
            continue
        dtype = schema.field(index).type
        if not spec.accepts(dtype):
            raise SchemaError(
                f"{where}: column {spec.name!r} has type {dtype}, expected a "
                f"{_FAMILIES[spec.kind]} ({spec.arrow_type()}); rewrite the file with "
                "FastVideo's schema (see fastwan.data.schema)"
            )
    return kind if kind in ("text", "i2v_text") else found


def is_absent(row: Mapping[str, Any], prefix: str) -> bool:
    """Whether a row leaves tensor ``prefix`` out, as FastVideo writes a missing one (empty
    bytes, shape ``[]``, dtype ``""``) or as a null."""
    data = row.get(f"{prefix}_bytes")
    return data is None or (len(data) == 0 and not row.get(f"{prefix}_shape"))


# ------------------------------------------------------------------------------ tensors


def encode_tensor(prefix: str, value: torch.Tensor | np.ndarray | None) -> dict[str, Any]:
    """``{prefix}_bytes / _shape / _dtype`` of a tensor, stored as float32 little-endian
    (uint8 images stay uint8); ``None``: absent, as FastVideo writes it (``b""``, ``[]``,
    ``""``)."""
    if value is None:
        return {f"{prefix}_bytes": b"", f"{prefix}_shape": [], f"{prefix}_dtype": ""}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.numpy() if value.dtype == torch.uint8 else value.float().numpy()
    if np.asarray(value).dtype == np.uint8:
        arr = np.ascontiguousarray(value)
        return {
            f"{prefix}_bytes": arr.tobytes(),
            f"{prefix}_shape": [int(d) for d in arr.shape],
            f"{prefix}_dtype": "uint8",
        }
    arr = np.ascontiguousarray(np.asarray(value), dtype="<f4")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{prefix} holds NaN or inf values; refusing to write a corrupt row")
    return {
        f"{prefix}_bytes": arr.tobytes(),
        f"{prefix}_shape": [int(d) for d in arr.shape],
        f"{prefix}_dtype": "float32",
    }


def _dtype_of(name: Any, where: str, column: str) -> torch.dtype:
    key = str(name).strip().lower().removeprefix("torch.") if name is not None else ""
    aliases = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16"}
    key = aliases.get(key, key)
    if key not in TENSOR_DTYPES:
        raise SchemaError(
            f"{where}: column {column!r} is {name!r}, expected one of {sorted(TENSOR_DTYPES)}"
        )
    return TENSOR_DTYPES[key]


def decode_tensor(
    row: Mapping[str, Any], prefix: str, where: str, ndim: int | None = None
) -> torch.Tensor:
    """The tensor ``prefix`` of a row as float32, checked: bytes present, shape a list of
    ``ndim`` non-negative ints, byte count = prod(shape) x itemsize, values finite.
    Raises :class:`SchemaError` naming ``where`` (file and row) and the column."""
    data = row.get(f"{prefix}_bytes")
    shape = row.get(f"{prefix}_shape")
    dtype_name = row.get(f"{prefix}_dtype")
    if data is None:
        raise SchemaError(f"{where}: column '{prefix}_bytes' is null")
    if shape is None or any(
        isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape
    ):
        raise SchemaError(
            f"{where}: column '{prefix}_shape' is {shape!r}, expected a list of sizes"
        )
    shape = [int(d) for d in shape]
    if ndim is not None and len(shape) != ndim:
        raise SchemaError(
            f"{where}: column '{prefix}_shape' is {shape}, expected {ndim} dimensions"
            + (" [C, T, H, W]" if ndim == 4 else " [L, dim]" if ndim == 2 else "")
        )
    dtype = _dtype_of(dtype_name, where, f"{prefix}_dtype")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise SchemaError(
            f"{where}: column '{prefix}_bytes' holds {len(data)} bytes but shape {shape} of "
            f"{dtype_name} needs {expected}; the row is corrupt (truncated or mislabelled)"
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret 16-bit words
        tensor = torch.from_numpy(raw.view("<u2").astype(np.int16)).view(torch.bfloat16)
    else:
        np_dtype = {
            torch.float32: "<f4",
            torch.float16: "<f2",
            torch.float64: "<f8",
            torch.uint8: "u1",
        }[dtype]
        tensor = torch.from_numpy(raw.view(np_dtype).copy())
    if dtype == torch.uint8:  # an image: kept as uint8, always finite
        return tensor.reshape(shape)
    tensor = tensor.to(torch.float32).reshape(shape)
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise SchemaError(
            f"{where}: column '{prefix}_bytes' holds NaN or inf values ({bad} of "
            f"{tensor.numel()}); the row is corrupt: re-encode the clip (fastwan preprocess) "
            "or delete the row",
            reason="non_finite",
        )
    return tensor


# -------------------------------------------------------------------------------- rows


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return value


def video_row(
    *,
    id: str,
    latent: torch.Tensor | np.ndarray,
    text_embedding: torch.Tensor | np.ndarray,
    caption: str,
    file_name: str,
    width: int,
    height: int,
    num_frames: int,
    fps: float,
    duration_sec: float | None = None,
    media_type: str = "video",
    generation_settings: str | None = None,
) -> dict[str, Any]:
    """One ``video`` row. ``latent``: ``[C, T, H, W]`` unnormalised posterior mean;
    ``text_embedding``: ``[L, dim]`` valid tokens; sizes in pixels, ``fps`` of the clip."""
    if len(latent.shape) != 4:
        raise ValueError(f"latent must be [C, T, H, W], got shape {tuple(latent.shape)}")
    if len(text_embedding.shape) != 2:
        raise ValueError(
            f"text_embedding must be [L, dim], got shape {tuple(text_embedding.shape)}"
        )
    row = {"id": _text(id, "id")}
    row.update(encode_tensor("vae_latent", latent))
    row.update(encode_tensor("text_embedding", text_embedding))
    row.update(
        file_name=_text(file_name, "file_name"),
        caption=_text(caption, "caption"),
        media_type=media_type,
        width=int(width),
        height=int(height),
        num_frames=int(num_frames),
        duration_sec=float(num_frames / fps if duration_sec is None else duration_sec),
        fps=float(fps),
    )
    if generation_settings is not None:
        row["generation_settings"] = _text(generation_settings, "generation_settings")
    return row


def text_row(*, id: str, text_embedding: torch.Tensor | np.ndarray, caption: str) -> dict:
    """One ``text`` row: ``text_embedding`` ``[L, dim]`` (valid tokens only)."""
    if len(text_embedding.shape) != 2:
        raise ValueError(
            f"text_embedding must be [L, dim], got shape {tuple(text_embedding.shape)}"
        )
    row = {"id": _text(id, "id")}
    row.update(encode_tensor("text_embedding", text_embedding))
    row.update(caption=_text(caption, "caption"), media_type="text")
    return row


def i2v_row(
    *,
    clip_feature: torch.Tensor | np.ndarray | None,
    first_frame_latent: torch.Tensor | np.ndarray,
    pil_image: torch.Tensor | np.ndarray | None = None,
    **video: Any,
) -> dict[str, Any]:
    """One ``i2v`` row: a :func:`video_row` (same arguments) plus the image condition.
    ``clip_feature``: ``[N, D]`` (None for models without an image encoder, e.g. Wan2.2
    TI2V); ``first_frame_latent``: ``[C, T, H, W]`` normalised (``[C, 1, H, W]`` for Wan2.2
    TI2V); ``pil_image``: ``[H, W, 3]`` uint8 (optional)."""
    _check_condition(clip_feature, first_frame_latent, pil_image)
    base = video_row(**video)
    row = {k: base[k] for k in list(base)[:7]}  # id, vae_latent_*, text_embedding_*
    row.update(encode_tensor("clip_feature", clip_feature))
    row.update(encode_tensor("first_frame_latent", first_frame_latent))
    row.update(encode_tensor("pil_image", pil_image))
    row.update({k: v for k, v in base.items() if k not in row})
    return row


def _check_condition(
    clip_feature: Any, first_frame_latent: Any, pil_image: Any, pil_required: bool = False
) -> None:
    if clip_feature is not None and len(clip_feature.shape) != 2:
        raise ValueError(f"clip_feature must be [N, D], got shape {tuple(clip_feature.shape)}")
    if len(first_frame_latent.shape) != 4:
        raise ValueError(
            f"first_frame_latent must be [C, T, H, W], got shape {tuple(first_frame_latent.shape)}"
        )
    if pil_image is None and pil_required:
        raise ValueError("pil_image ([H, W, 3] uint8, the conditioning image) is required")
    if pil_image is not None and (len(pil_image.shape) != 3 or pil_image.shape[-1] != 3):
        raise ValueError(f"pil_image must be [H, W, 3] uint8, got {tuple(pil_image.shape)}")


def i2v_text_row(
    *,
    id: str,
    text_embedding: torch.Tensor | np.ndarray,
    caption: str,
    clip_feature: torch.Tensor | np.ndarray | None,
    first_frame_latent: torch.Tensor | np.ndarray,
    pil_image: torch.Tensor | np.ndarray,
    file_name: str,
    width: int,
    height: int,
    num_frames: int,
) -> dict[str, Any]:
    """One ``i2v_text`` row (data-free image-to-video): ``text_embedding`` ``[L, dim]``
    (valid tokens), the image condition as in :func:`i2v_row` (``pil_image`` required: it
    is the image the prompt goes with), ``file_name`` the image file, and the clip size
    (pixels, frames) the condition was computed for."""
    _check_condition(clip_feature, first_frame_latent, pil_image, pil_required=True)
    base = text_row(id=id, text_embedding=text_embedding, caption=caption)
    row = {k: base[k] for k in list(base)[:4]}  # id, text_embedding_*
    row.update(encode_tensor("clip_feature", clip_feature))
    row.update(encode_tensor("first_frame_latent", first_frame_latent))
    row.update(encode_tensor("pil_image", pil_image))
    row.update(
        file_name=_text(file_name, "file_name"),
        caption=base["caption"],
        media_type="image",
        width=int(width),
        height=int(height),
        num_frames=int(num_frames),
    )
    return row


def validate_row(row: Mapping[str, Any], schema: pa.Schema, where: str) -> None:
    """A row about to be written has exactly the schema's columns and decodable tensors."""
    missing = [n for n in schema.names if n not in row]
    extra = [n for n in row if n not in schema.names]
    if missing or extra:
        raise SchemaError(
            f"{where}: row columns do not match the schema (missing {missing}, extra {extra})"
        )
    for prefix, ndim in (
        ("vae_latent", 4),
        ("text_embedding", 2),
        ("clip_feature", 2),
        ("first_frame_latent", 4),
        ("pil_image", 3),
    ):
        if f"{prefix}_bytes" in schema.names and not (
            prefix in I2V_TENSORS and prefix != "first_frame_latent" and is_absent(row, prefix)
        ):
            decode_tensor(row, prefix, where, ndim)
