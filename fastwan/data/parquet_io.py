"""Reading and writing parquet shards: atomic shard writes, resumable output folders.

A writer buffers rows and writes ``rows_per_shard`` of them at a time to
``shard-RRR-NNNNNN.parquet`` (``RRR`` the writing rank), first to a hidden temporary
file, then renamed into place: a shard on disk is always complete, an interrupted write
leaves only a temporary file that the next run removes.

The shards themselves are the record of what is done: :class:`ResumableOutput` reads the
``id`` column of every shard when it opens a folder, so a re-run skips exactly the rows
already written (no duplicates, whatever moment the previous run stopped at). The folder
also holds ``dataset.json`` (the kind of shards and the settings they were made with; a
re-run with other settings is refused) and ``summary.json`` (counts, and every skipped
input with its reason).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fastwan.data.schema import DatasetKind, SchemaError, arrow_schema, validate_row

__all__ = [
    "DATASET_META",
    "EMPTY_PROMPT_FILE",
    "ResumableOutput",
    "ShardWriter",
    "atomic_write_json",
    "list_parquet_files",
    "read_ids",
    "summary_path",
]

DATASET_META = "dataset.json"
EMPTY_PROMPT_FILE = "empty_prompt_embedding.npy"
FORMAT_NAME = "fastvideo-parquet"
_SHARD = re.compile(r"^shard-(\d{3,})-(\d{6,})\.parquet$")


def list_parquet_files(path: str | Path) -> list[Path]:
    """Every ``*.parquet`` file under ``path`` (recursively, sorted; hidden files and
    folders -- temporary files among them -- left out), or ``[path]`` for one file."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{str(path)!r} is not a .parquet file; pass a folder of shards")
        return [path]
    if not path.is_dir():
        raise ValueError(f"dataset path {str(path)!r} does not exist; pass a folder of shards")
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in names if n.endswith(".parquet") and n[0] != "."]
    return sorted(files)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_ids(files: Iterable[Path]) -> dict[str, Path]:
    """id -> shard of every row of ``files`` (only the ``id`` column is read)."""
    out: dict[str, Path] = {}
    for file in files:
        try:
            ids = pq.read_table(file, columns=["id"]).column("id").to_pylist()
        except (pa.ArrowException, OSError, KeyError) as err:
            raise SchemaError(
                f"{file}: cannot read its 'id' column ({type(err).__name__}: {err}); the "
                "shard is corrupt: delete it and re-run (its rows will be made again)"
            ) from None
        for row_id in ids:
            if row_id in out:
                raise SchemaError(
                    f"{file}: id {row_id!r} is also in {out[row_id]}; duplicate rows: delete "
                    "one of the two shards"
                )
            out[row_id] = file
    return out


def summary_path(out_dir: Path, rank: int, world_size: int) -> Path:
    name = "summary.json" if world_size == 1 else f"summary-rank{rank:03d}.json"
    return Path(out_dir) / name


class ShardWriter:
    """Buffers rows and writes them ``rows_per_shard`` at a time, atomically.

    Rows are checked against the schema before they are buffered (a bad row raises, it is
    never written). ``row_group_size`` rows per parquet row group (1: a map-style reader
    decodes one row per sample, not a whole group).
    """

    def __init__(
        self,
        out_dir: str | Path,
        schema: pa.Schema,
        rows_per_shard: int,
        *,
        rank: int = 0,
        row_group_size: int = 1,
    ) -> None:
        if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int):
            raise ValueError(f"rows_per_shard must be an int, got {rows_per_shard!r}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self.rank = int(rank)
        self._rows: list[dict[str, Any]] = []
        self.shards_written: list[Path] = []
        self.rows_written = 0
        prefix = f"shard-{self.rank:03d}-"
        for stale in self.out_dir.glob(f".{prefix}*.tmp*"):  # a previous run's partial write
            stale.unlink()
        taken = [
            int(m.group(2))
            for p in self.out_dir.iterdir()
            if (m := _SHARD.match(p.name)) and int(m.group(1)) == self.rank
        ]
        self._next_index = max(taken, default=-1) + 1
        # Statistics of multi-megabyte binary columns would bloat the footer.
        self._stats_columns = [
            f.name for f in schema if not pa.types.is_binary(f.type) and f.name != "caption"
        ]

    @property
    def pending(self) -> int:
        """Rows buffered, not yet on disk."""
        return len(self._rows)

    def add(self, row: Mapping[str, Any]) -> Path | None:
        """Buffer one row; write a shard when ``rows_per_shard`` are buffered (its path)."""
        validate_row(row, self.schema, f"row {row.get('id')!r}")
        self._rows.append(dict(row))
        if len(self._rows) >= self.rows_per_shard:
            return self.flush()
        return None

    def flush(self) -> Path | None:
        """Write the buffered rows (if any) as one shard; return its path."""
        if not self._rows:
            return None
        name = f"shard-{self.rank:03d}-{self._next_index:06d}.parquet"
        final = self.out_dir / name
        tmp = self.out_dir / f".{name}.tmp"
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        with open(tmp, "wb") as f:
            pq.write_table(
                table,
                f,
                row_group_size=self.row_group_size,
                write_statistics=self._stats_columns,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._next_index += 1
        self.rows_written += len(self._rows)
        self._rows = []
        self.shards_written.append(final)
        return final


class ResumableOutput:
    """An output folder of shards that a re-run continues without duplicating rows.

    Opening it: checks ``dataset.json`` (same kind and settings as before, or writes it),
    removes this rank's temporary files, reads the ids already written. Then
    :meth:`is_done` tells which rows to skip, :meth:`add` buffers rows,
    :meth:`skip` records an input that could not be used (with its reason), and
    :meth:`finish` flushes the last shard and writes the summary.
    """

    def __init__(
        self,
        out_dir: str | Path,
        kind: DatasetKind,
        settings: Mapping[str, Any],
        *,
        rows_per_shard: int,
        rank: int = 0,
        world_size: int = 1,
        extra_columns: tuple[str, ...] = (),
        row_group_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.settings = json.loads(json.dumps(dict(settings)))  # plain JSON values
        self.rank, self.world_size = rank, world_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._check_meta()
        self.schema = arrow_schema(kind, extra_columns)
        self.writer = ShardWriter(
            self.out_dir, self.schema, rows_per_shard, rank=rank, row_group_size=row_group_size
        )
        self.done: dict[str, Path] = read_ids(list_parquet_files(self.out_dir))
        self.rows_before = len(self.done)
        self._buffered: set[str] = set()
        self.skipped: list[dict[str, str]] = []

    def _check_meta(self) -> None:
        meta_file = self.out_dir / DATASET_META
        meta = {"format": FORMAT_NAME, "kind": self.kind, "settings": self.settings}
        if meta_file.is_file():
            old = json.loads(meta_file.read_text())
            if old.get("kind") != self.kind:
                raise ValueError(
                    f"{self.out_dir} holds {old.get('kind')!r} shards; cannot add "
                    f"{self.kind!r} shards to it: choose another --out folder"
                )
            before = old.get("settings", {})
            changed = sorted(
                k for k in set(before) | set(self.settings) if before.get(k) != self.settings.get(k)
            )
            if changed:
                diffs = "; ".join(
                    f"{k}: {before.get(k)!r} before, {self.settings.get(k)!r} now" for k in changed
                )
                raise ValueError(
                    f"{self.out_dir} was started with other settings ({diffs}); resume with the "
                    "same settings, or write to a new --out folder"
                )
        else:  # every rank writes the same content: a race is harmless
            atomic_write_json(meta_file, meta)

    def is_done(self, row_id: str) -> bool:
        """Whether a row with this id is on disk or buffered."""
        return row_id in self.done or row_id in self._buffered

    def add(self, row: Mapping[str, Any]) -> None:
        row_id = row["id"]
        if self.is_done(row_id):
            raise ValueError(f"row id {row_id!r} is already written; ids must be unique")
        self.writer.add(row)
        self._buffered.add(row_id)

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        """Record an input that produced no row (``reason``: a short category)."""
        self.skipped.append({"item": item, "reason": reason, "detail": detail})

    def save_array(self, name: str, array: np.ndarray) -> Path:
        """Store a small array next to the shards (e.g. the empty prompt's embedding)."""
        path = self.out_dir / name
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def finish(self, *, total_items: int, complete: bool = True, **extra: Any) -> dict:
        """Flush the last shard; write and return the summary."""
        self.writer.flush()
        reasons = Counter(s["reason"] for s in self.skipped)
        summary = {
            "kind": self.kind,
            "complete": complete,
            "rank": self.rank,
            "world_size": self.world_size,
            "inputs": total_items,
            "rows_before": self.rows_before,
            "rows_written": self.writer.rows_written,
            "rows_total": self.rows_before + self.writer.rows_written,
            "shards_written": [p.name for p in self.writer.shards_written],
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(sorted(reasons.items())),
            "skipped_items": self.skipped,
            "settings": self.settings,
            **extra,
        }
        atomic_write_json(summary_path(self.out_dir, self.rank, self.world_size), summary)
        return summary
