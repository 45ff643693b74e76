"""The server's state without HTTP: the job store, the workers, the expiry janitor, request
checks, job views, health and Prometheus metrics. :mod:`fastwan.serve.app` puts routes on it.

Start order: open (and lock) the state folder, re-queue what the last server left running,
load one generator per device group, start the workers; only then does the HTTP server bind,
so a server that answers has workers ready.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastwan.serve.schemas import (
    LORA_NAME,
    Health,
    Job,
    Progress,
    RequestView,
    VideoRequest,
    WorkerInfo,
)
from fastwan.serve.store import STAGES, JobRecord, JobStore, QueueFull
from fastwan.serve.worker import (
    Worker,
    attention_of,
    load_adapters,
    load_generator,
    parse_devices,
)

if TYPE_CHECKING:
    from fastwan.pipeline import VideoGenerator

logger = logging.getLogger("fastwan.serve")

# Upper bounds (seconds) of the stage-time histograms: toy clips to 14B videos.
HISTOGRAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
DEFAULT_JOB_SECONDS = 10.0  # the Retry-After estimate before any job has finished
MAX_RETRY_AFTER_S = 600


class RequestError(ValueError):
    """A request the model refuses (``VideoGenerator.check_inputs``): the field and why."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


class QueueFullError(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class ServeOptions:
    """What ``fastwan serve`` serves and how (the command's flags)."""

    model: str
    state_dir: Path
    devices: str = "cpu"  # see worker.parse_devices
    devices_per_worker: int = 1
    queue_size: int = 16  # jobs that may wait
    ttl: float = 3600.0  # seconds a finished job's result is kept
    # VideoGenerator.from_pretrained options (preset, dtype, backend, compile, ...).
    load_options: dict[str, Any] = field(default_factory=dict)
    # LoRA adapters a request may name: name -> (path, default scale); see parse_lora.
    loras: dict[str, tuple[str, float]] = field(default_factory=dict)


def parse_lora(text: str) -> tuple[str, str, float]:
    """``--lora NAME=PATH[:SCALE]`` -> (name, path, scale); a ValueError naming the flag
    and the fix. PATH (a ``.safetensors`` file or a LoRA folder) must exist; SCALE
    defaults to 1 (as trained)."""
    from fastwan.serve.schemas import MAX_LORA_SCALE

    name, sep, rest = str(text).partition("=")
    if not sep or not rest:
        raise ValueError(f"--lora must be NAME=PATH[:SCALE], got {text!r}")
    if not re.fullmatch(LORA_NAME, name):
        raise ValueError(
            f"--lora name {name!r}: use letters, digits, '_' and '-' (at most 64, no dots); "
            "requests choose the adapter by it"
        )
    path, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:  # a ':' inside the path
            pass
    if not (math.isfinite(scale) and 0.0 <= scale <= MAX_LORA_SCALE):
        raise ValueError(f"--lora {name}: SCALE must be in [0, {MAX_LORA_SCALE:g}], got {tail}")
    if not Path(path).expanduser().exists():
        raise ValueError(
            f"--lora {name}: {path!r} does not exist; pass a LoRA .safetensors file or folder"
        )
    return name, str(Path(path).expanduser()), scale


def field_of(message: str, fields: Sequence[str]) -> str | None:
    """The request field a model's error message names first (None if it names none)."""
    found = [
        (m.start(), name)
        for name in fields
        if (m := re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", message))
    ]
    return min(found)[1] if found else None


class ServeRuntime:
    """Store, workers and janitor of one server; :meth:`close` stops them."""

    def __init__(self, options: ServeOptions, *, cuda_count: int | None = None) -> None:
        if cuda_count is None and options.devices != "cpu":
            import torch

            cuda_count = torch.cuda.device_count()
        groups = parse_devices(options.devices, options.devices_per_worker, cuda_count=cuda_count)
        self.options = options
        self.store = JobStore(options.state_dir, max_queued=options.queue_size, ttl=options.ttl)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.workers: list[Worker] = []
        self.rejected = 0  # 429s since this server started
        self._generators: list[Any] = []  # what close() closes (multi-device: processes)
        self._janitor: threading.Thread | None = None
        try:
            self.store.bind_model(str(options.model))
            recovered = self.store.recover()
            if recovered["requeued"] or recovered["failed"]:
                logger.warning(
                    "re-queued %d jobs the last server left running (%d failed after too many "
                    "tries)",
                    recovered["requeued"],
                    recovered["failed"],
                )
            backend = options.load_options.get("backend", "auto")
            for i, group in enumerate(groups):
                gen = load_generator(options.model, group, **options.load_options)
                self._generators.append(gen)
                loras = load_adapters(gen, options.loras)
                self.workers.append(
                    Worker(
                        f"w{i}", gen, self.store, stop=self.stop_event, wake=self.wake,
                        backend=backend, loras=loras,
                    )
                )  # fmt: skip
        except BaseException:
            self._close_generators()
            self.store.close()
            raise
        # checks requests (a multi-device one on its weightless model, in this process)
        self.generator: VideoGenerator = self.workers[0].generator
        self.default_attention = attention_of(self.generator)
        for worker in self.workers:
            worker.start()
        self._janitor = threading.Thread(target=self._expire_loop, name="fastwan-serve-ttl")
        self._janitor.daemon = True
        self._janitor.start()

    # ------------------------------------------------------------------ lifecycle
    def _expire_loop(self) -> None:
        interval = min(max(self.store.ttl / 4, 0.2), 30.0)
        while True:
            try:
                self.store.expire()
            except Exception:  # a closed store at shutdown, a disk hiccup
                if self.stop_event.is_set():
                    return
                logger.exception("expiring old results failed")
            if self.stop_event.wait(interval):
                return

    def close(self, timeout: float = 120.0) -> None:
        """Stop the workers (a running job stops at its next step and goes back to the
        queue), then close the store. Idempotent."""
        self.stop_event.set()
        self.wake.set()
        deadline = time.monotonic() + timeout
        for thread in [*self.workers, self._janitor]:
            if thread is not None and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [w.worker_name for w in self.workers if w.is_alive()]
        if stuck:  # its job stays 'running' and is re-queued by the next start
            logger.warning("workers %s did not stop within %gs", stuck, timeout)
        self._close_generators()
        self.store.close()

    def _close_generators(self) -> None:
        """Stop the worker processes of multi-device generators (idempotent)."""
        for gen in self._generators:
            close = getattr(gen, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # shutting down: log it, close the rest
                    logger.exception("closing a generator failed")

    # ------------------------------------------------------------------ requests
    def check(self, request: VideoRequest) -> tuple[str, float | None, int]:
        """The model's checks of a request, before it is queued: (attention, sparsity,
        denoising steps); a :class:`RequestError` naming the field otherwise."""
        if request.lora is not None and request.lora not in self.options.loras:
            have = sorted(self.options.loras)
            raise RequestError(
                "lora",
                f"lora {request.lora!r} is not an adapter of this server; "
                + (
                    f"it has {', '.join(have)}"
                    if have
                    else "it registers none (start it with --lora NAME=PATH)"
                ),
            )
        try:
            plan = self.generator.check_inputs(**request.generate_kwargs())
        except ValueError as err:
            fields = list(VideoRequest.model_fields)
            raise RequestError(field_of(str(err), fields), str(err)) from None
        total = plan["steps"] if plan.get("steps") is not None else len(plan["timesteps"])
        default_mode, default_sparsity = self.default_attention
        mode = request.attention or default_mode
        sparsity = None
        if mode == "vsa":
            if request.sparsity is not None:
                sparsity = request.sparsity
            elif default_mode == "vsa":
                sparsity = default_sparsity
            else:
                sparsity = float(self.generator.preset.sparsity)
        elif request.sparsity is not None:  # dense by default, sparsity alone given
            raise RequestError(
                "sparsity",
                f"sparsity applies to attention 'vsa'; this model runs {mode!r} by default: "
                "pass attention 'vsa' too, or drop sparsity",
            )
        return mode, sparsity, int(total)

    def submit(self, request: VideoRequest) -> JobRecord:
        """Check and queue a request; :class:`QueueFullError` (with Retry-After seconds)
        when the queue is full."""
        mode, sparsity, total = self.check(request)
        try:
            job = self.store.submit(
                request.model_dump(mode="json"), attention=mode, sparsity=sparsity, total=total
            )
        except QueueFull as err:
            self.rejected += 1
            raise QueueFullError(str(err), self.retry_after()) from None
        self.wake.set()
        return job

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: a mean job's time over the workers."""
        mean = self.store.mean_seconds() or DEFAULT_JOB_SECONDS
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(mean / len(self.workers)))))

    def view(self, job: JobRecord) -> Job:
        position = self.store.queue_position(job) if job.status == "queued" else None
        expires = job.finished + self.store.ttl if job.finished is not None else None
        return Job(
            id=job.id,
            status=job.status,
            progress=Progress(step=job.step, total=job.total),
            queue_position=position,
            created_at=job.created,
            started_at=job.started,
            finished_at=job.finished,
            expires_at=expires,
            attention=job.attention,
            sparsity=job.sparsity,
            request=RequestView.of(VideoRequest.model_validate(job.request)),
            timings=job.timings,
            error=job.error,
            content_url=f"/v1/videos/{job.id}/content" if job.status == "succeeded" else None,
        )

    def content_path(self, job: JobRecord) -> Path | None:
        """The MP4 of a succeeded job, if it is still there."""
        if job.status != "succeeded" or not job.has_video:
            return None
        path = self.store.video_path(job.id)
        return path if path.is_file() else None

    # ------------------------------------------------------------------ health, metrics
    @property
    def model_name(self) -> str:
        return self.generator.preset.name or str(self.options.model)

    def health(self) -> Health:
        workers = [
            WorkerInfo(name=w.worker_name, device=w.device, alive=w.healthy, job=w.job)
            for w in self.workers
        ]
        ok = all(w.alive for w in workers) and not self.stop_event.is_set()
        return Health(
            status="ok" if ok else "unavailable",
            model=self.model_name,
            task=self.generator.task,
            loras=sorted(self.options.loras),
            workers=workers,
            queue_depth=self.store.counts()["queued"],
            queue_capacity=self.store.max_queued,
        )

    def metrics(self) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        counts = self.store.counts()
        busy = sum(w.job is not None for w in self.workers)
        lines = [
            "# HELP fastwan_queue_depth Jobs waiting for a worker.",
            "# TYPE fastwan_queue_depth gauge",
            f"fastwan_queue_depth {counts['queued']}",
            "# HELP fastwan_queue_capacity Jobs that may wait before requests get 429.",
            "# TYPE fastwan_queue_capacity gauge",
            f"fastwan_queue_capacity {self.store.max_queued}",
            "# HELP fastwan_jobs Jobs in the state folder, by state.",
            "# TYPE fastwan_jobs gauge",
            *(f'fastwan_jobs{{state="{s}"}} {n}' for s, n in counts.items()),
            "# HELP fastwan_workers Workers (one per device group), by activity.",
            "# TYPE fastwan_workers gauge",
            f'fastwan_workers{{state="busy"}} {busy}',
            f'fastwan_workers{{state="idle"}} {len(self.workers) - busy}',
            "# HELP fastwan_rejected_total Submissions refused with 429 (queue full).",
            "# TYPE fastwan_rejected_total counter",
            f"fastwan_rejected_total {self.rejected}",
        ]
        hist = self.store.histograms(HISTOGRAM_BUCKETS)
        for metric, names, label, help_ in (
            ("fastwan_stage_seconds", STAGES, "stage", "Seconds per generation stage."),
            ("fastwan_queue_wait_seconds", ("queue_wait",), None, "Seconds from submit to run."),
        ):
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} histogram"]
            for name in names:
                cumulative, count, total = hist[name]
                tag = f'{label}="{name}",' if label else ""
                for le, c in zip(HISTOGRAM_BUCKETS, cumulative):
                    lines.append(f'{metric}_bucket{{{tag}le="{le:g}"}} {c}')
                lines.append(f'{metric}_bucket{{{tag}le="+Inf"}} {count}')
                braces = f"{{{tag.rstrip(',')}}}" if tag else ""
                lines += [f"{metric}_sum{braces} {total:.6f}", f"{metric}_count{braces} {count}"]
        return "\n".join(lines) + "\n"
