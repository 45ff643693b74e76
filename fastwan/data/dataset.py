"""A map-style dataset over a folder of parquet shards (fastwan's or FastVideo's).

Each sample: the VAE latents ``[C, T, H, W]`` normalised with the VAE's
``latents_mean`` / ``latents_std`` (``(z - mean) / std``, per channel) -- absent for
text-only data --, the text embedding padded with zeros to ``text_length`` tokens
``[text_length, dim]`` with its mask ``[text_length]`` (True on valid tokens), and, with
probability ``cfg_dropout``, the empty prompt's embedding instead of the caption's.

Keys are an index or ``(index, epoch)`` (what :class:`fastwan.data.sampler.DistributedSampler`
yields): the CFG-dropout draw is a function of (seed, epoch, index) alone, so it does not
depend on worker processes or on where a resumed run restarted.

Bad data: the schema of every file is checked when the dataset opens (a missing column
or a column of the wrong type raises :class:`~fastwan.data.schema.SchemaError` naming the
file and the column); an unreadable file, or a corrupt row (byte count not matching its
shape, NaN, unknown dtype) raises naming the file and row -- or, with
``on_error="skip"``, is skipped and counted (``skipped_files``; a corrupt row is replaced by
the next good row and reported in the sample's ``skipped`` list).
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from fastwan.data.parquet_io import EMPTY_PROMPT_FILE, list_parquet_files
from fastwan.data.schema import SchemaError, decode_tensor, validate_schema

__all__ = ["LatentDataset", "collate_samples", "pad_text"]

# Consecutive corrupt rows tolerated in skip mode before giving up (the data is broken).
MAX_CONSECUTIVE_BAD_ROWS = 64


def pad_text(embedding: torch.Tensor, length: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, dim]`` -> (``[length, dim]`` zero-padded, mask ``[length]`` bool)."""
    n, dim = embedding.shape
    if n > length:
        raise ValueError(
            f"{where}: the text embedding has {n} tokens, more than text_length={length}; "
            f"raise text_length (Wan's text encoder gives up to 512 tokens)"
        )
    padded = torch.zeros(length, dim, dtype=torch.float32)
    padded[:n] = embedding
    mask = torch.zeros(length, dtype=torch.bool)
    mask[:n] = True
    return padded, mask


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from several ints (independent streams for (seed, epoch, index))."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values])
    return int(state.generate_state(1, dtype=np.uint64)[0] & np.uint64(0x7FFFFFFFFFFFFFFF))


def _split_key(key: Any) -> tuple[int, int]:
    if isinstance(key, (tuple, list)) and len(key) == 2:
        return int(key[0]), int(key[1])
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key), 0
    if isinstance(key, torch.Tensor) and key.dim() == 0:
        return int(key), 0
    raise TypeError(f"dataset keys are an index or (index, epoch), got {key!r}")


class LatentDataset(Dataset):
    """Parquet shards under ``path`` as training samples (see the module docstring).

    Args:
        path: a folder of shards (searched recursively) or one ``.parquet`` file.
        text_length: tokens the text embedding is padded to (Wan: 512).
        text_only: read only text embeddings (data-free distillation); latent shards are
            accepted too (their latents are not read).
        latents_mean, latents_std: the VAE's per-channel statistics
            (:func:`fastwan.data.encoders.vae_latent_stats`); required unless
            ``normalize=False`` or ``text_only``.
        cfg_dropout: probability of replacing the text with the empty prompt's embedding.
        empty_embedding: the empty prompt's embedding ``[L, dim]`` (a tensor, an array or
            a ``.npy`` file); default ``<path>/empty_prompt_embedding.npy``, written by the
            fastwan data commands. Needed only when ``cfg_dropout > 0``.
        seed: seed of the CFG-dropout draws.
        on_error: ``"raise"`` (default) or ``"skip"`` corrupt files and rows.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        text_length: int = 512,
        text_only: bool = False,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        normalize: bool = True,
        cfg_dropout: float = 0.0,
        empty_embedding: torch.Tensor | np.ndarray | str | Path | None = None,
        seed: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        if isinstance(text_length, bool) or not isinstance(text_length, int) or text_length < 1:
            raise ValueError(f"text_length must be a positive int, got {text_length!r}")
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = Path(path)
        self.text_length = text_length
        self.text_only = bool(text_only)
        self.cfg_dropout = float(cfg_dropout)
        self.seed = int(seed)
        self.on_error = on_error
        self.skipped_files: list[tuple[str, str]] = []  # (file, reason)
        self.files: list[Path] = []
        self.row_groups: list[list[int]] = []  # per file: first row of each row group
        lengths: list[int] = []
        kind = "text" if self.text_only else "video"
        for file in list_parquet_files(self.path):
            try:
                meta = pq.read_metadata(file)
                schema = meta.schema.to_arrow_schema()
                validate_schema(schema, str(file), kind)
            except (pa.ArrowException, OSError, SchemaError) as err:
                reason = (
                    str(err)
                    if isinstance(err, SchemaError)
                    else (
                        f"{file}: unreadable parquet file ({type(err).__name__}: {err}); the file "
                        "is corrupt or truncated: restore or delete it"
                    )
                )
                if on_error == "raise":
                    raise SchemaError(reason + " (or pass on_error='skip' to skip it)") from None
                self.skipped_files.append((str(file), reason))
                warnings.warn(f"skipping {reason}", stacklevel=2)
                continue
            if meta.num_rows == 0:
                continue
            starts = np.cumsum(
                [0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            )
            self.files.append(file)
            self.row_groups.append(starts[:-1].tolist())
            lengths.append(meta.num_rows)
        if not self.files:
            raise ValueError(
                f"no readable parquet rows under {str(self.path)!r}"
                + (f" ({len(self.skipped_files)} files skipped)" if self.skipped_files else "")
                + "; write shards with `fastwan preprocess`, `preprocess-text` or `synthesize`"
            )
        self.offsets = np.cumsum([0] + lengths).tolist()  # first global index of each file
        self.columns = [
            "id",
            "caption",
            "text_embedding_bytes",
            "text_embedding_shape",
            "text_embedding_dtype",
        ]
        if not self.text_only:
            self.columns += ["vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype"]
            if normalize:
                if latents_mean is None or latents_std is None:
                    raise ValueError(
                        "latents_mean and latents_std are needed to normalise the latents: pass "
                        "the VAE's (fastwan.data.encoders.vae_latent_stats(model_path)), or "
                        "normalize=False for latents that are already normalised"
                    )
                mean = torch.tensor(list(latents_mean), dtype=torch.float32)
                std = torch.tensor(list(latents_std), dtype=torch.float32)
                if mean.shape != std.shape or mean.dim() != 1 or not torch.all(std > 0):
                    raise ValueError(
                        "latents_mean and latents_std must be equal-length lists, std > 0"
                    )
                self._mean = mean.view(-1, 1, 1, 1)  # [C, 1, 1, 1]
                self._inv_std = (1.0 / std).view(-1, 1, 1, 1)  # [C, 1, 1, 1]
            else:
                self._mean = self._inv_std = None
        self.empty_embedding: torch.Tensor | None = None  # [L0, dim]
        if self.cfg_dropout > 0:
            self.empty_embedding = self._load_empty(empty_embedding)
            pad_text(self.empty_embedding, text_length, "the empty prompt")
        self._handles: dict[int, pq.ParquetFile] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------ helpers
    def _load_empty(self, value: Any) -> torch.Tensor:
        if value is None:
            value = (self.path if self.path.is_dir() else self.path.parent) / EMPTY_PROMPT_FILE
            if not value.is_file():
                raise ValueError(
                    f"cfg_dropout > 0 needs the empty prompt's embedding: {value} does not "
                    "exist; pass empty_embedding= (a [L, dim] tensor or .npy file, e.g. from "
                    "fastwan.data.encoders.WanTextEncoder([''])), or set cfg_dropout 0"
                )
        if isinstance(value, (str, Path)):
            value = np.load(value)
        tensor = torch.as_tensor(np.asarray(value), dtype=torch.float32)
        if tensor.dim() != 2:
            raise ValueError(f"empty_embedding must be [L, dim], got {tuple(tensor.shape)}")
        return tensor

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict:  # open file handles do not cross processes
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _handle(self, f: int) -> pq.ParquetFile:
        if self._pid != os.getpid():  # a forked worker: do not share the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if f not in self._handles:
            self._handles[f] = pq.ParquetFile(self.files[f], memory_map=False)
        return self._handles[f]

    def locate(self, index: int) -> tuple[Path, int]:
        """(file, row within the file) of a global index."""
        f = bisect.bisect_right(self.offsets, index) - 1
        return self.files[f], index - self.offsets[f]

    def _read_row(self, index: int) -> tuple[dict[str, Any], str]:
        f = bisect.bisect_right(self.offsets, index) - 1
        local = index - self.offsets[f]
        where = f"{self.files[f]} row {local}"
        try:
            g = bisect.bisect_right(self.row_groups[f], local) - 1
            table = self._handle(f).read_row_group(g, columns=self.columns)
            row = table.slice(local - self.row_groups[f][g], 1).to_pylist()[0]
        except (pa.ArrowException, OSError) as err:
            raise SchemaError(f"{where}: unreadable ({type(err).__name__}: {err})") from None
        return row, where

    def _sample(self, index: int) -> dict[str, Any]:
        row, where = self._read_row(index)
        if row.get("id") is None or row.get("caption") is None:
            raise SchemaError(f"{where}: 'id' or 'caption' is null")
        text = decode_tensor(row, "text_embedding", where, ndim=2)  # [L, dim]
        sample: dict[str, Any] = {
            "id": row["id"],
            "caption": row["caption"],
            "index": index,
            "source": where,
            "text_raw": text,
        }
        if not self.text_only:
            latents = decode_tensor(row, "vae_latent", where, ndim=4)  # [C, T, H, W]
            if self._mean is not None:
                if latents.shape[0] != self._mean.shape[0]:
                    raise ValueError(
                        f"{where}: the latents have {latents.shape[0]} channels but "
                        f"latents_mean/std have {self._mean.shape[0]}; use the statistics of "
                        "the VAE that encoded this dataset"
                    )
                latents = (latents - self._mean) * self._inv_std  # [C, T, H, W]
            sample["latents"] = latents
        return sample

    # ------------------------------------------------------------------ access
    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch = _split_key(key)
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} rows")
        skipped: list[str] = []
        current = index
        while True:
            try:
                sample = self._sample(current)
                break
            except SchemaError as err:
                if self.on_error == "raise":
                    raise SchemaError(
                        f"{err} (pass on_error='skip' to skip corrupt rows)"
                    ) from None
                skipped.append(str(err))
                if len(skipped) >= min(MAX_CONSECUTIVE_BAD_ROWS, n):
                    raise SchemaError(
                        f"{len(skipped)} consecutive corrupt rows from index {index} (last: "
                        f"{err}); the dataset is broken"
                    ) from None
                current = (current + 1) % n
        text = sample.pop("text_raw")  # [L, dim]
        dropped = False
        if self.cfg_dropout > 0:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, index))
            dropped = bool(torch.rand((), generator=g) < self.cfg_dropout)
        if dropped:
            if self.empty_embedding.shape[1] != text.shape[1]:
                raise ValueError(
                    f"{sample['source']}: text dim {text.shape[1]} differs from the empty "
                    f"prompt's {self.empty_embedding.shape[1]}; use the same text encoder"
                )
            text = self.empty_embedding
        embedding, mask = pad_text(text, self.text_length, sample["source"])
        sample.update(
            text_embedding=embedding,  # [text_length, dim]
            text_mask=mask,  # [text_length]
            cfg_dropped=dropped,
            epoch=epoch,
            skipped=skipped,
        )
        return sample


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: ``latents`` ``[B, C, T, H, W]`` (when present),
    ``text_embedding`` ``[B, L, dim]``, ``text_mask`` ``[B, L]``, ``cfg_dropped`` ``[B]``,
    ``index`` ``[B]``; ``id`` / ``caption`` / ``source`` lists; ``skipped`` (all corrupt
    rows replaced in this batch). Latents of different shapes raise a ValueError naming
    the rows of each shape."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for name in ("latents", "text_embedding"):
        if name not in samples[0]:
            continue
        shapes: dict[tuple, list[str]] = {}
        for s in samples:
            shapes.setdefault(tuple(s[name].shape), []).append(f"{s['source']} (id {s['id']!r})")
        if len(shapes) > 1:
            detail = "; ".join(
                f"{list(shape)} in {', '.join(rows)}" for shape, rows in shapes.items()
            )
            raise ValueError(
                f"{name} of different shapes in one batch: {detail}. Preprocess every clip at "
                "one size (--height/--width/--num-frames), or train with micro_batch_size 1"
            )
        batch[name] = torch.stack([s[name] for s in samples])
    batch["text_mask"] = torch.stack([s["text_mask"] for s in samples])  # [B, L]
    batch["cfg_dropped"] = torch.tensor([s["cfg_dropped"] for s in samples])  # [B]
    batch["index"] = torch.tensor([s["index"] for s in samples])  # [B]
    for name in ("id", "caption", "source", "epoch"):
        batch[name] = [s[name] for s in samples]
    batch["skipped"] = [msg for s in samples for msg in s["skipped"]]
    return batch
