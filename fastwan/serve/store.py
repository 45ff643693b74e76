"""The durable job queue of ``fastwan serve``: SQLite (stdlib ``sqlite3``) plus MP4 files.

Everything a job is lives in ``STATE_DIR/jobs.sqlite3`` (WAL, ``synchronous=FULL``: a
submitted job is on disk before its id is returned); its video is
``STATE_DIR/videos/<id>.mp4``, a name the server makes from the job id (32 hex digits), so
no path from a request is ever opened. On opening, jobs that were ``running`` when the last
server stopped or crashed go back to the queue (after :data:`MAX_ATTEMPTS` interrupted runs
a job fails instead, so a job that kills the server cannot crash it forever), and video
files no succeeded job owns are deleted. One server at a time: the folder is locked.

Job life: ``queued`` -> ``running`` -> ``succeeded`` / ``failed`` / ``cancelled``; a
finished job turns ``expired`` (its video deleted) ``ttl`` seconds after it finished.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastwan.choices import JOB_STATES

try:  # POSIX: one server per state folder (an advisory lock the OS drops if we die)
    import fcntl
except ImportError:  # pragma: no cover - Windows: no folder lock
    fcntl = None

SCHEMA_VERSION = 1
DB_NAME = "jobs.sqlite3"
VIDEOS_DIR = "videos"
LOCK_NAME = "lock"
# Runs a job may start before it is given up on (each server stop or crash mid-run is one).
MAX_ATTEMPTS = 3
STAGES = ("text_encode", "denoise", "decode", "total")
FINISHED = ("succeeded", "failed", "cancelled")
JOB_ID = re.compile(r"[0-9a-f]{32}")
_VIDEO_NAME = re.compile(r"([0-9a-f]{32})\.mp4")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the queue is FIFO
    id TEXT UNIQUE NOT NULL,                -- uuid4 hex
    status TEXT NOT NULL,
    request TEXT NOT NULL,                  -- the validated VideoRequest, JSON
    attention TEXT NOT NULL,                -- resolved at submission: what the job runs
    sparsity REAL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    error TEXT,
    text_encode REAL, denoise REAL, decode REAL, total_seconds REAL,
    has_video INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""
_COLUMNS = (
    "seq, id, status, request, attention, sparsity, created, started, finished, step, total, "
    "attempts, worker, error, text_encode, denoise, decode, total_seconds, has_video"
)


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs."""


@dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table."""

    seq: int
    id: str
    status: str
    request: dict[str, Any]
    attention: str
    sparsity: float | None
    created: float
    started: float | None
    finished: float | None
    step: int
    total: int
    attempts: int
    worker: str | None
    error: str | None
    timings: dict[str, float] | None  # seconds per stage; succeeded jobs only
    has_video: bool

    @classmethod
    def from_row(cls, row: tuple) -> JobRecord:
        (seq, id_, status, request, attention, sparsity, created, started, finished, step,
         total, attempts, worker, error, enc, den, dec, tot, has_video) = row  # fmt: skip
        timings = None
        if tot is not None:
            timings = {"text_encode": enc, "denoise": den, "decode": dec, "total": tot}
        return cls(
            seq, id_, status, json.loads(request), attention, sparsity, created, started,
            finished, step, total, attempts, worker, error, timings, bool(has_video),
        )  # fmt: skip


def check_job_id(job_id: str) -> str:
    """A job id as the server makes them (uuid4 hex, 32 lowercase hex digits), or a
    ValueError: the only way from a request to a file."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id must be 32 lowercase hex digits, got {job_id!r}")
    return job_id


class JobStore:
    """The jobs table and the videos folder of one ``state_dir``; thread-safe (one
    connection behind a lock: every operation is a short transaction).

    max_queued: jobs that may wait (:meth:`submit` raises :class:`QueueFull` beyond).
    ttl: seconds a finished job's result is kept (:meth:`expire`).
    """

    def __init__(self, state_dir: str | Path, *, max_queued: int, ttl: float) -> None:
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
            raise ValueError(f"max_queued (--queue-size) must be an int >= 1, got {max_queued!r}")
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not ttl > 0:
            raise ValueError(f"ttl (--ttl) must be a number of seconds > 0, got {ttl!r}")
        self.state_dir = Path(state_dir)
        self.max_queued = max_queued
        self.ttl = float(ttl)
        try:
            self.videos_dir = self.state_dir / VIDEOS_DIR
            self.videos_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"--state-dir {str(self.state_dir)!r} cannot be created: {err.strerror or err}"
            ) from err
        self._lock_file = self._take_folder_lock()
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.state_dir / DB_NAME, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._check_schema()
        except sqlite3.DatabaseError as err:
            self._release_folder_lock()
            raise ValueError(
                f"--state-dir {str(self.state_dir)!r}: {DB_NAME} is not a fastwan job database "
                f"({err}); pass another --state-dir"
            ) from err

    # ------------------------------------------------------------------ lifecycle
    def _take_folder_lock(self):
        if fcntl is None:
            return None
        handle = open(self.state_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ValueError(
                f"--state-dir {str(self.state_dir)!r} is in use by another fastwan serve; stop "
                "it or pass another --state-dir"
            ) from None
        return handle

    def _release_folder_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"schema version {row[0]}, this fastwan reads {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._release_folder_lock()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise RuntimeError("the job store is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def bind_model(self, model: str) -> None:
        """Record which model the folder's jobs were checked against; a different model
        while jobs still wait is a ValueError (their sizes were checked for the other)."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
            if row is not None and row[0] != model:
                (waiting,) = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
                ).fetchone()
                if waiting:
                    raise ValueError(
                        f"--state-dir {str(self.state_dir)!r} holds {waiting} unfinished jobs "
                        f"for model {row[0]!r}; serve that model, or pass another --state-dir"
                    )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?)", (model,))

    def recover(self) -> dict[str, int]:
        """After a stop or crash: ``running`` jobs back to the queue (or failed past
        :data:`MAX_ATTEMPTS`), video files of no succeeded job and half-written ones
        deleted. Returns the counts (requeued, failed, files_removed)."""
        with self._transaction() as db:
            failed = db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, worker = NULL, error = ? "
                "WHERE status = 'running' AND attempts >= ?",
                (
                    time.time(),
                    f"interrupted {MAX_ATTEMPTS} times (the server stopped or crashed while "
                    "it ran); not tried again",
                    MAX_ATTEMPTS,
                ),
            ).rowcount
            requeued = db.execute(
                "UPDATE jobs SET status = 'queued', step = 0, started = NULL, worker = NULL "
                "WHERE status = 'running'"
            ).rowcount
            owned = {r[0] for r in db.execute("SELECT id FROM jobs WHERE has_video = 1").fetchall()}
        removed = 0
        for path in self.videos_dir.iterdir():
            match = _VIDEO_NAME.fullmatch(path.name)
            if path.is_file() and (match is None or match.group(1) not in owned):
                path.unlink(missing_ok=True)  # a partial write, or a video no job owns
                removed += 1
        return {"requeued": requeued, "failed": failed, "files_removed": removed}

    # ------------------------------------------------------------------ jobs
    def video_path(self, job_id: str) -> Path:
        """Where job ``job_id``'s MP4 is (written by the worker, read by the server)."""
        return self.videos_dir / f"{check_job_id(job_id)}.mp4"

    def submit(
        self,
        request: dict[str, Any],
        *,
        attention: str,
        sparsity: float | None,
        total: int,
        now: float | None = None,
    ) -> JobRecord:
        """Queue a validated request; :class:`QueueFull` when ``max_queued`` wait already."""
        job_id = uuid.uuid4().hex
        with self._transaction() as db:
            (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
            if queued >= self.max_queued:
                raise QueueFull(f"{queued} jobs are waiting (the queue's maximum)")
            db.execute(
                "INSERT INTO jobs (id, status, request, attention, sparsity, created, total) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (
                    job_id,
                    json.dumps(request, sort_keys=True),
                    attention,
                    sparsity,
                    time.time() if now is None else now,
                    int(total),
                ),
            )
            return self._get(db, job_id)

    @staticmethod
    def _get(db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord.from_row(row)

    def get(self, job_id: str) -> JobRecord | None:
        with self._transaction() as db:
            return self._get(db, job_id)

    def queue_position(self, job: JobRecord) -> int:
        """Queued jobs ahead of ``job``."""
        with self._transaction() as db:
            (ahead,) = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", (job.seq,)
            ).fetchone()
        return ahead

    def claim(self, worker: str) -> JobRecord | None:
        """The oldest queued job, now ``running`` on ``worker``; None when none waits."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', started = ?, step = 0, worker = ?, "
                "attempts = attempts + 1 WHERE id = ?",
                (time.time(), worker, row[0]),
            )
            return self._get(db, row[0])

    def progress(self, job_id: str, step: int, total: int) -> bool:
        """Record ``step`` of ``total`` done; False when the job is no longer running
        (cancelled): the worker stops it."""
        with self._transaction() as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET step = ?, total = ? WHERE id = ? AND status = 'running'",
                    (int(step), int(total), job_id),
                ).rowcount
            )

    def succeed(self, job_id: str, timings: dict[str, float]) -> bool:
        """Mark a running job done, its video written at :meth:`video_path`; False when it
        was cancelled meanwhile (the caller deletes the video)."""
        with self._transaction() as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET status = 'succeeded', finished = ?, step = total, "
                    "has_video = 1, text_encode = ?, denoise = ?, decode = ?, total_seconds = ? "
                    "WHERE id = ? AND status = 'running'",
                    (time.time(), *(float(timings[k]) for k in STAGES), job_id),
                ).rowcount
            )

    def fail(self, job_id: str, error: str) -> bool:
        with self._transaction() as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET status = 'failed', finished = ?, error = ? "
                    "WHERE id = ? AND status = 'running'",
                    (time.time(), error, job_id),
                ).rowcount
            )

    def requeue(self, job_id: str) -> bool:
        """A running job back to the front of the queue (its worker is stopping: this run
        does not count as an attempt)."""
        with self._transaction() as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET status = 'queued', step = 0, started = NULL, worker = NULL, "
                    "attempts = MAX(attempts - 1, 0) WHERE id = ? AND status = 'running'",
                    (job_id,),
                ).rowcount
            )

    def cancel(self, job_id: str) -> tuple[str, JobRecord] | None:
        """Cancel a queued or running job (a running one stops at its next step, when its
        worker's progress update finds it cancelled). Returns (the status it had, the
        job), or None for an unknown id; a finished job is returned unchanged."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job is None:
                return None
            if job.status in ("queued", "running"):
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?",
                    (time.time(), job_id),
                )
            return job.status, self._get(db, job_id)

    def expire(self, now: float | None = None) -> list[str]:
        """Finished jobs older than ``ttl`` become ``expired`` and their videos are
        deleted; returns their ids."""
        cutoff = (time.time() if now is None else now) - self.ttl
        with self._transaction() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                    "AND finished <= ?",
                    (cutoff,),
                ).fetchall()
            ]
            db.executemany(
                "UPDATE jobs SET status = 'expired', has_video = 0 WHERE id = ?",
                [(i,) for i in ids],
            )
        for job_id in ids:  # after the commit: a crash here leaves files recover() deletes
            self.video_path(job_id).unlink(missing_ok=True)
        return ids

    # ------------------------------------------------------------------ statistics
    def counts(self) -> dict[str, int]:
        """Jobs per state (every state listed, zeros included)."""
        with self._transaction() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update(dict(rows))
        return counts

    def mean_seconds(self, last: int = 20) -> float | None:
        """Mean run time of the last ``last`` succeeded jobs (None before the first)."""
        with self._transaction() as db:
            (mean,) = db.execute(
                "SELECT AVG(total_seconds) FROM (SELECT total_seconds FROM jobs WHERE "
                "total_seconds IS NOT NULL ORDER BY finished DESC LIMIT ?)",
                (last,),
            ).fetchone()
        return mean

    def histograms(self, buckets: Sequence[float]) -> dict[str, tuple[list[int], int, float]]:
        """Per stage (and ``queue_wait``, started - created) over every job that ran to
        the end: (cumulative counts at each bucket's upper bound, count, sum)."""
        columns = {
            **{s: ("total_seconds" if s == "total" else s) for s in STAGES},
            "queue_wait": "(started - created)",
        }
        out = {}
        with self._transaction() as db:
            for name, col in columns.items():
                le = ", ".join(f"TOTAL({col} <= ?)" for _ in buckets)
                row = db.execute(
                    f"SELECT COUNT({col}), TOTAL({col}), {le} FROM jobs "
                    "WHERE total_seconds IS NOT NULL",
                    tuple(buckets),
                ).fetchone()
                out[name] = ([int(c) for c in row[2:]], int(row[0]), float(row[1]))
        return out
