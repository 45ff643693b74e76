"""A map-style dataset over a folder of parquet shards (fastwan's or FastVideo's).

Each sample: the VAE latents ``[C, T, H, W]`` normalised with the VAE's
``latents_mean`` / ``latents_std`` (``(z - mean) / std``, per channel) -- absent for
text-only data --, the text embedding padded with zeros to ``text_length`` tokens
``[text_length, dim]`` with its mask ``[text_length]`` (True on valid tokens), and, with
probability ``cfg_dropout``, the empty prompt's embedding instead of the caption's.

Keys are an index or ``(index, epoch)`` (what :class:`fastwan.data.sampler.DistributedSampler`
yields): the CFG-dropout draw is a function of (seed, epoch, index) alone, so it does not
depend on worker processes or on where a resumed run restarted.

Clip size (``latent_shape``, the recipe's ``[C, T, H, W]`` from
:func:`fastwan.train.build.latent_shape_of`): latents with more latent frames than ``T`` are
cropped in time to ``T`` frames (latent-aligned) at a start drawn from a generator seeded
with (seed, epoch, index) -- so the crop, like the CFG-dropout draw, is the same whatever
the worker processes and wherever a resumed run restarted -- or at frame 0 with
``temporal_crop="first"`` (FastVideo's ``latents[:, :, :num_latent_t]``). Latents with
fewer frames are ``too_short``, another channel count or spatial size is
``shape_mismatch``. The ``vae_latent_shape`` column of every file is read when the dataset
opens: when no row fits, or (with ``on_error="raise"``) when any row does not, it raises
naming the rows, the files and the fix before any training starts.

Bad data: the schema of every file is checked when the dataset opens (a missing column
or a column of the wrong type raises :class:`~fastwan.data.schema.SchemaError` naming the
file and the column); an unreadable file, or a bad row raises naming the file, the row,
the column and the fix -- or, with ``on_error="skip"``, is skipped and counted. A bad row is
one that is unreadable, truncated or mislabelled (reason ``decode_error``), holds NaN / inf
or values larger in magnitude than ``max_abs_latent`` (``non_finite``; e.g. latents of
1e30, which would otherwise end training in a non-finite loss that names no row), or has
latents of another size (``shape_mismatch`` / ``too_short``). Unreadable files are listed
in ``skipped_files``; a skipped row is replaced by the next good row and reported, with its
reason, file and row, in the sample's ``skipped`` list (one entry: the row that was asked
for; rows passed over while looking for a replacement are counted when they are asked for
themselves), which :func:`collate_samples` gathers into ``batch["skipped"]`` and the
:class:`~fastwan.train.trainer.Trainer` counts (console, trackers, the run's summary).
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from fastwan.data.parquet_io import EMPTY_PROMPT_FILE, list_parquet_files
from fastwan.data.schema import (
    I2V_TENSORS,
    SchemaError,
    decode_tensor,
    is_absent,
    validate_schema,
)

__all__ = ["SKIP_REASONS", "LatentDataset", "collate_samples", "pad_text"]

# Consecutive corrupt rows tolerated in skip mode before giving up (the data is broken).
MAX_CONSECUTIVE_BAD_ROWS = 64

# Why a row is skipped (SchemaError.reason), in the order reports list them.
SKIP_REASONS = ("decode_error", "non_finite", "shape_mismatch", "too_short")

# Stream id of the temporal-crop draw (independent of the CFG-dropout draw).
_CROP_STREAM = 0x43524F50
_SHAPE_FIX = (
    "set data.num_frames / data.height / data.width to the clip size the data was encoded "
    "at (latent frames = (num_frames - 1) // the VAE's temporal stride + 1), or re-encode "
    "the clips at the recipe's size (fastwan preprocess)"
)


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


_PARTS = ("bytes", "shape", "dtype")


class LatentDataset(Dataset):
    """Parquet shards under ``path`` as training samples (see the module docstring).

    Args:
        path: a folder of shards (searched recursively) or one ``.parquet`` file.
        text_length: tokens the text embedding is padded to (Wan: 512).
        text_only: read only text embeddings (data-free distillation), and with
            ``image_condition`` the image condition too; latent shards are accepted too
            (their latents are not read).
        latents_mean, latents_std: the VAE's per-channel statistics
            (:func:`fastwan.data.encoders.vae_latent_stats`); required unless
            ``normalize=False`` or ``text_only``.
        cfg_dropout: probability of replacing the text with the empty prompt's embedding.
        empty_embedding: the empty prompt's embedding ``[L, dim]`` (a tensor, an array or
            a ``.npy`` file); default ``<path>/empty_prompt_embedding.npy``, written by the
            fastwan data commands. Needed only when ``cfg_dropout > 0``.
        seed: seed of the CFG-dropout and temporal-crop draws (the trainer passes
            ``train.seed``).
        on_error: ``"raise"`` (default) or ``"skip"`` corrupt files and rows.
        latent_shape: the ``[C, T, H, W]`` latents are trained at (None: as stored);
            longer latents are cropped in time, others skipped (see the module docstring).
        max_abs_latent: latents (after normalisation) larger in magnitude than this are a
            bad row (``non_finite``); None: only NaN / inf are.
        temporal_crop: ``"random"`` (a start drawn per (seed, epoch, index)) or
            ``"first"`` (the first ``T`` latent frames).
        image_condition: read the image condition of ``i2v`` shards (FastVideo's
            ``pyarrow_schema_i2v``): ``first_frame_latent`` ``[C, T, H, W]`` (stored
            normalised, cut to the trained latent frames; a Wan2.2 TI2V condition, the
            image's latent alone, stays ``[C, 1, H, W]``), ``clip_feature`` ``[N, D]`` and
            ``pil_image`` ``[H, W, 3]`` uint8 when the rows have them. The image is the
            clip's first frame, so latents are then always cut from their first frame.
            With ``text_only`` (data-free image-to-video): the text and image condition of
            ``i2v_text`` shards (``fastwan preprocess-text --task i2v``) or of ``i2v``
            shards (latents not read); the condition is checked against ``latent_shape``
            when given. Text-to-video shards are refused.
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
        latent_shape: Sequence[int] | None = None,
        max_abs_latent: float | None = 1000.0,
        temporal_crop: Literal["random", "first"] = "random",
        image_condition: bool = False,
    ) -> None:
        if isinstance(text_length, bool) or not isinstance(text_length, int) or text_length < 1:
            raise ValueError(f"text_length must be a positive int, got {text_length!r}")
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if temporal_crop not in ("random", "first"):
            raise ValueError(f"temporal_crop must be 'random' or 'first', got {temporal_crop!r}")
        if max_abs_latent is not None and not (
            isinstance(max_abs_latent, (int, float)) and 0 < max_abs_latent < float("inf")
        ):
            raise ValueError(f"max_abs_latent must be a finite number > 0, got {max_abs_latent!r}")
        if latent_shape is not None:
            latent_shape = tuple(latent_shape)
            if len(latent_shape) != 4 or any(
                isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                for d in latent_shape
            ):
                raise ValueError(
                    f"latent_shape must be four positive ints [C, T, H, W], got {latent_shape!r}"
                )
            latent_shape = tuple(int(d) for d in latent_shape)
        self.latent_shape: tuple[int, int, int, int] | None = latent_shape
        self.max_abs_latent = None if max_abs_latent is None else float(max_abs_latent)
        self.image_condition = bool(image_condition)
        # the condition image is the clip's first frame: a crop must start there
        self.temporal_crop = "first" if self.image_condition else temporal_crop
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
        kind = {  # what the files must hold: (text_only, image_condition) -> kind
            (True, False): "text",
            (True, True): "i2v_text",
            (False, True): "i2v",
            (False, False): "video",
        }[(self.text_only, self.image_condition)]
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
        if self.image_condition:
            self.columns += [f"{t}_{part}" for t in I2V_TENSORS for part in _PARTS]
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
        # Rows whose stored latent shape does not fit latent_shape: reason -> count.
        self.shape_skips: dict[str, int] = {}
        if self.latent_shape is not None and not self.text_only:
            self._scan_shapes()

    # ------------------------------------------------------------------ shapes
    def _shape_problem(self, shape: Sequence[int], where: str) -> SchemaError | None:
        """Why latents of ``shape`` cannot train at ``latent_shape`` (None: they can,
        possibly after a temporal crop)."""
        want = self.latent_shape
        assert want is not None
        shape = [int(d) for d in shape]
        if len(shape) != 4:
            return None  # decode_tensor names the malformed shape (decode_error)
        if shape[0] != want[0] or shape[2:] != list(want[2:]):
            return SchemaError(
                f"{where}: column 'vae_latent_shape' is {shape} [C, T, H, W], but the recipe "
                f"trains on latents of {want[0]} channels x {want[2]} x {want[3]} (latent "
                f"shape {list(want)}); {_SHAPE_FIX}",
                reason="shape_mismatch",
            )
        if shape[1] < want[1]:
            return SchemaError(
                f"{where}: column 'vae_latent_shape' is {shape}: {shape[1]} latent frames, "
                f"fewer than the recipe's {want[1]} (latent shape {list(want)}); lower "
                f"data.num_frames, or {_SHAPE_FIX}",
                reason="too_short",
            )
        return None

    def _scan_shapes(self) -> None:
        """Read every file's ``vae_latent_shape`` column (small) and refuse now what cannot
        train: no row of the recipe's size, or any row of another size under
        ``on_error="raise"``."""
        problems: list[SchemaError] = []
        counts: dict[str, int] = {}
        for file in self.files:
            try:
                shapes = pq.read_table(file, columns=["vae_latent_shape"]).column(0).to_pylist()
            except (pa.ArrowException, OSError) as err:
                raise SchemaError(
                    f"{file}: cannot read its 'vae_latent_shape' column ({type(err).__name__}: "
                    f"{err}); the file is corrupt: restore or delete it"
                ) from None
            for row, shape in enumerate(shapes):
                if shape is None:
                    continue  # decode_tensor names the null (decode_error)
                problem = self._shape_problem(shape, f"{file} row {row}")
                if problem is not None:
                    counts[problem.reason] = counts.get(problem.reason, 0) + 1
                    if len(problems) < 3:
                        problems.append(problem)
        total = len(self)
        bad = sum(counts.values())
        if not bad:
            return
        by_reason = ", ".join(f"{r} {counts[r]}" for r in SKIP_REASONS if r in counts)
        examples = "; ".join(str(p) for p in problems[:2])
        if bad == total:
            raise SchemaError(
                f"no row of {str(self.path)!r} fits the recipe's latent shape "
                f"{list(self.latent_shape)}: all {total} rows have latents of another size "
                f"({by_reason}). First: {examples}",
                reason=problems[0].reason,
            )
        if self.on_error == "raise":
            raise SchemaError(
                f"{bad} of {total} rows of {str(self.path)!r} have latents of another size "
                f"than the recipe's {list(self.latent_shape)} ({by_reason}). First: "
                f"{examples} (or skip and count such rows: data.on_error: skip, i.e. "
                "on_error='skip')",
                reason=problems[0].reason,
            )
        self.shape_skips = counts
        warnings.warn(
            f"{bad} of {total} rows of {str(self.path)!r} have latents of another size than "
            f"the recipe's {list(self.latent_shape)} ({by_reason}): they will be skipped and "
            f"counted. First: {examples}",
            stacklevel=3,
        )

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

    def _sample(self, index: int, key_index: int, epoch: int) -> dict[str, Any]:
        """Row ``index`` decoded and checked; latents cropped by the draw of the key
        ``(key_index, epoch)`` that asked for it."""
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
            latents = decode_tensor(row, "vae_latent", where, ndim=4)  # [C, T', H, W]
            if self.latent_shape is not None:
                problem = self._shape_problem(latents.shape, where)
                if problem is not None:
                    raise problem
            if self._mean is not None:
                if latents.shape[0] != self._mean.shape[0]:
                    raise ValueError(
                        f"{where}: the latents have {latents.shape[0]} channels but "
                        f"latents_mean/std have {self._mean.shape[0]}; use the statistics of "
                        "the VAE that encoded this dataset"
                    )
                latents = (latents - self._mean) * self._inv_std  # [C, T', H, W]
            if self.max_abs_latent is not None:
                peak = float(latents.abs().max()) if latents.numel() else 0.0
                if not peak <= self.max_abs_latent:  # also catches an overflow to inf
                    raise SchemaError(
                        f"{where}: column 'vae_latent_bytes' holds values of magnitude up to "
                        f"{peak:.3g}{' after normalisation' if self._mean is not None else ''}"
                        f", more than max_abs_latent {self.max_abs_latent:g}; the row is "
                        "corrupt: re-encode the clip (fastwan preprocess) or delete the row "
                        "(or raise data.max_abs_latent if such latents are real)",
                        reason="non_finite",
                    )
            start = 0
            if self.latent_shape is not None and latents.shape[1] > self.latent_shape[1]:
                frames = self.latent_shape[1]
                start = self._crop_start(latents.shape[1] - frames, key_index, epoch)
                latents = latents[:, start : start + frames].contiguous()  # [C, T, H, W]
            sample["latents"] = latents
            sample["crop_start"] = start
            if self.image_condition:
                sample.update(self._image_condition(row, where, latents.shape))
        elif self.image_condition:  # data-free image-to-video: the recipe's shape, if given
            sample.update(self._image_condition(row, where, self.latent_shape, text_only=True))
        return sample

    def _image_condition(
        self,
        row: Mapping[str, Any],
        where: str,
        latent_shape: Sequence[int] | None,
        text_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The row's image condition, checked against its (cut) latents ``[C, T, H, W]``
        (text-only rows: against the trained ``latent_shape``, when known). A condition of
        one latent frame is Wan2.2 TI2V's (the image's latent alone) and is kept as it is."""
        if is_absent(row, "first_frame_latent"):
            raise SchemaError(f"{where}: column 'first_frame_latent_bytes' is empty")
        first = decode_tensor(row, "first_frame_latent", where, ndim=4)  # [C, T', H, W]
        if latent_shape is not None:
            c, t, h, w = latent_shape
            frames_ok = first.shape[1] == 1 or first.shape[1] >= t
            if first.shape[0] != c or tuple(first.shape[2:]) != (h, w) or not frames_ok:
                what = "the recipe's latent shape" if text_only else "the clip's latents"
                fix = (
                    "`fastwan preprocess-text --task i2v` at the recipe's --height / --width / "
                    "--num-frames with the trained model's folder"
                    if text_only
                    else "`fastwan preprocess --task i2v`"
                )
                raise SchemaError(
                    f"{where}: column 'first_frame_latent_shape' is {list(first.shape)}, which "
                    f"does not match {what} {list(latent_shape)} [C, T, H, W]; re-encode the "
                    f"{'image' if text_only else 'clip'} with {fix}",
                    reason="shape_mismatch",
                )
            first = first[:, :t]  # [C, T or 1, H, W]
        out = {"first_frame_latent": first.contiguous()}
        if not is_absent(row, "clip_feature"):
            out["clip_feature"] = decode_tensor(row, "clip_feature", where, ndim=2)  # [N, D]
        if not is_absent(row, "pil_image"):
            out["pil_image"] = decode_tensor(row, "pil_image", where, ndim=3)  # [H, W, 3]
        return out

    def _crop_start(self, slack: int, index: int, epoch: int) -> int:
        """First latent frame of a temporal crop with ``slack`` frames to spare."""
        if self.temporal_crop == "first":
            return 0
        g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, index, _CROP_STREAM))
        return int(torch.randint(slack + 1, (), generator=g))

    # ------------------------------------------------------------------ access
    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch = _split_key(key)
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} rows")
        skipped: list[dict[str, Any]] = []
        current, tries = index, 0
        while True:
            try:
                sample = self._sample(current, index, epoch)
                break
            except SchemaError as err:
                reason = getattr(err, "reason", "decode_error")
                if self.on_error == "raise":
                    raise SchemaError(
                        f"{err} (or skip and count such rows: data.on_error: skip, i.e. "
                        "on_error='skip')",
                        reason,
                    ) from None
                if current == index:  # the row asked for; passed-over rows count when asked
                    file, row = self.locate(current)
                    skipped.append(
                        {"reason": reason, "file": str(file), "row": row, "message": str(err)}
                    )
                tries += 1
                if tries >= min(MAX_CONSECUTIVE_BAD_ROWS, n):
                    raise SchemaError(
                        f"{tries} consecutive bad rows from index {index} (last: {err}); the "
                        "dataset is broken",
                        reason,
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
    ``index`` ``[B]``; ``id`` / ``caption`` / ``source`` / ``epoch`` (and ``crop_start``)
    lists; ``skipped``: one ``{"reason", "file", "row", "message"}`` per row of this batch
    that was skipped (and replaced). Latents of different shapes raise a ValueError naming
    the rows of each shape."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for name in ("latents", "text_embedding", "first_frame_latent", "clip_feature", "pil_image"):
        if name not in samples[0]:
            continue
        if not all(name in s for s in samples):
            lacking = ", ".join(s["source"] for s in samples if name not in s)
            raise ValueError(
                f"{name} is missing from some rows of one batch ({lacking}); every row of an "
                "image-to-video dataset needs the same image condition"
            )
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
    for name in ("id", "caption", "source", "epoch", "crop_start"):
        if name in samples[0]:
            batch[name] = [s[name] for s in samples]
    batch["skipped"] = [msg for s in samples for msg in s["skipped"]]
    return batch
