"""FastVideo's published parquet schemas, spelled out independently of fastwan's writer
(tests compare fastwan against them and write FastVideo-format files with pyarrow)."""

import pyarrow as pa

# FastVideo's pyarrow_schema_t2v / pyarrow_schema_text_only, spelled out independently.
FASTVIDEO_T2V = [
    ("id", pa.string()),
    ("vae_latent_bytes", pa.binary()),
    ("vae_latent_shape", pa.list_(pa.int64())),
    ("vae_latent_dtype", pa.string()),
    ("text_embedding_bytes", pa.binary()),
    ("text_embedding_shape", pa.list_(pa.int64())),
    ("text_embedding_dtype", pa.string()),
    ("file_name", pa.string()),
    ("caption", pa.string()),
    ("media_type", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("num_frames", pa.int64()),
    ("duration_sec", pa.float64()),
    ("fps", pa.float64()),
]
FASTVIDEO_TEXT_ONLY = [
    ("id", pa.string()),
    ("text_embedding_bytes", pa.binary()),
    ("text_embedding_shape", pa.list_(pa.int64())),
    ("text_embedding_dtype", pa.string()),
    ("caption", pa.string()),
]
# FastVideo's pyarrow_schema_i2v (fastvideo/dataset/dataloader/schema.py): the t2v columns
# with the image condition after the text embedding.
FASTVIDEO_I2V = [
    *FASTVIDEO_T2V[:7],
    *[
        (f"{t}_{part}", kind)
        for t in ("clip_feature", "first_frame_latent", "pil_image")
        for part, kind in (
            ("bytes", pa.binary()),
            ("shape", pa.list_(pa.int64())),
            ("dtype", pa.string()),
        )
    ],
    *FASTVIDEO_T2V[7:],
]
