"""Training data: the parquet schema (FastVideo-compatible), the dataset and its distributed
resumable sampler, and the cores of ``fastwan preprocess`` / ``preprocess-text`` /
``synthesize``. Model-dependent encoders live in :mod:`fastwan.data.encoders` (imported on
demand: it pulls in diffusers / transformers)."""

from fastwan.data.dataset import LatentDataset, collate_samples, pad_text
from fastwan.data.parquet_io import (
    EMPTY_PROMPT_FILE,
    ResumableOutput,
    ShardWriter,
    list_parquet_files,
    read_ids,
)
from fastwan.data.preprocess import preprocess_prompts, preprocess_videos
from fastwan.data.sampler import DistributedSampler, ResumableLoader, build_train_loader
from fastwan.data.schema import (
    I2V_COLUMNS,
    I2V_TEXT_COLUMNS,
    TEXT_COLUMNS,
    VIDEO_COLUMNS,
    SchemaError,
    arrow_schema,
    decode_tensor,
    i2v_row,
    i2v_text_row,
    text_row,
    validate_schema,
    video_row,
)
from fastwan.data.sources import (
    PromptItem,
    VideoItem,
    load_captions,
    load_image_prompts,
    load_prompts,
)
from fastwan.data.synthesize import sample_seed, synthesize
from fastwan.data.video_decode import VideoDecodeError, decode_clip, resize_center_crop

__all__ = [
    "EMPTY_PROMPT_FILE",
    "I2V_COLUMNS",
    "I2V_TEXT_COLUMNS",
    "TEXT_COLUMNS",
    "VIDEO_COLUMNS",
    "DistributedSampler",
    "LatentDataset",
    "PromptItem",
    "ResumableLoader",
    "ResumableOutput",
    "SchemaError",
    "ShardWriter",
    "VideoDecodeError",
    "VideoItem",
    "arrow_schema",
    "build_train_loader",
    "collate_samples",
    "decode_clip",
    "decode_tensor",
    "i2v_row",
    "i2v_text_row",
    "list_parquet_files",
    "load_captions",
    "load_image_prompts",
    "load_prompts",
    "pad_text",
    "preprocess_prompts",
    "preprocess_videos",
    "read_ids",
    "resize_center_crop",
    "sample_seed",
    "synthesize",
    "text_row",
    "validate_schema",
    "video_row",
]
