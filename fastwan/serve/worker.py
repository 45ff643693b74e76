"""Workers of ``fastwan serve``: one thread per device group, each owning one
:class:`~fastwan.pipeline.VideoGenerator`.

Why threads, not processes: a worker spends its time inside torch (which releases the GIL),
so threads lose little; every worker shares the server's job store and the one loaded
check of request sizes; and a device group that spans several devices is the generator's
own business: :class:`~fastwan.multi_device.MultiDeviceGenerator` starts one process per
device of the group and offers what a worker uses (``check_inputs``, ``set_attention``,
the LoRA methods, progress, a callback that stops a call at a step), so a second layer of
processes here would only add a protocol. A crash that kills the interpreter
(a segfault in a kernel) takes the whole server down; the job store then re-queues the
job it was running on the next start (:data:`fastwan.serve.store.MAX_ATTEMPTS` tries).

A worker claims the oldest queued job, applies its attention and LoRA settings, generates
with a step callback that records progress and stops the job when it was cancelled (or the server
is stopping: the job goes back to the queue), writes the MP4 and marks the job done.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastwan.serve.schemas import VideoRequest
from fastwan.serve.store import JobRecord, JobStore

if TYPE_CHECKING:  # type hints only: the pipeline imports torch and diffusers
    from fastwan.pipeline import VideoGenerator

logger = logging.getLogger("fastwan.serve")

IDLE_POLL_S = 0.2  # an idle worker looks at the queue this often (besides being woken)


class JobCancelled(Exception):
    """Raised from the step callback: the job was cancelled while it ran."""


class WorkerStopping(Exception):
    """Raised from the step callback: the server is stopping; the job is re-queued."""


def parse_devices(
    spec: str, per_worker: int = 1, *, cuda_count: int | None = None
) -> list[tuple[str, ...]]:
    """``--devices`` / ``--devices-per-worker`` -> one tuple of torch device names per
    worker. ``spec``: ``cpu`` (one CPU worker; ``cpu,cpu`` two, or one of two processes
    with ``per_worker`` 2), or CUDA indices ``0,1,2,3`` (``cuda:0,...`` works too),
    grouped ``per_worker`` at a time in the order given. cuda_count: the CUDA devices there
    are (indices are checked against it)."""
    if isinstance(per_worker, bool) or not isinstance(per_worker, int) or per_worker < 1:
        raise ValueError(f"--devices-per-worker must be an int >= 1, got {per_worker!r}")
    items = [item.strip().lower() for item in str(spec).split(",")]
    if not items or any(not item for item in items):
        raise ValueError(
            f"--devices must be 'cpu' or comma-separated CUDA indices (e.g. 0,1), got {spec!r}"
        )
    if all(item == "cpu" for item in items):
        if len(items) % per_worker:
            raise ValueError(
                f"--devices lists 'cpu' {len(items)} times, not a multiple of "
                f"--devices-per-worker {per_worker}: list it once per process (e.g. "
                "--devices cpu,cpu --devices-per-worker 2: one worker of two processes)"
            )
        return [("cpu",) * per_worker for _ in range(len(items) // per_worker)]
    names = []
    for item in items:
        index = item.removeprefix("cuda:")
        if not index.isdigit():
            raise ValueError(
                f"--devices: {item!r} is not a CUDA index (0, 1, ... or cuda:0) and CPU and "
                "CUDA devices do not mix; pass e.g. --devices 0,1 or --devices cpu"
            )
        if cuda_count is not None and int(index) >= cuda_count:
            raise ValueError(
                f"--devices: cuda:{int(index)} does not exist (this machine has {cuda_count} "
                "CUDA devices)"
            )
        names.append(f"cuda:{int(index)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--devices lists a device twice: {spec!r}; each GPU joins one worker")
    if len(names) % per_worker:
        raise ValueError(
            f"--devices has {len(names)} devices, not a multiple of --devices-per-worker "
            f"{per_worker}; pass a multiple or another --devices-per-worker"
        )
    return [tuple(names[i : i + per_worker]) for i in range(0, len(names), per_worker)]


def load_generator(model: str, group: Sequence[str], **options: Any) -> Any:
    """The generator of one device group (``options``: the other ``from_pretrained``
    arguments): a :class:`VideoGenerator` on one device, or a
    :class:`~fastwan.multi_device.MultiDeviceGenerator` with one process per device of a
    larger group (sequence / CFG parallel over exactly those devices)."""
    if len(group) == 1:
        from fastwan.pipeline import VideoGenerator

        return VideoGenerator.from_pretrained(model, **dict(options, device=group[0]))
    from fastwan.multi_device import MultiDeviceGenerator

    single = [f"--{k.replace('_', '-')}" for k in ("cpu_offload", "compile") if options.get(k)]
    if single:
        raise ValueError(
            f"--devices-per-worker {len(group)}: {', '.join(single)} runs on one device per "
            "worker only; drop it or pass --devices-per-worker 1"
        )
    options = {k: v for k, v in options.items() if k not in ("cpu_offload", "compile")}
    return MultiDeviceGenerator(model, len(group), devices=list(group), **options)


def load_adapters(generator: Any, loras: dict[str, tuple[str, float]]) -> dict[str, float]:
    """Load each registered adapter (name -> (path, scale)) into ``generator`` at scale 0
    (a job turns its own on): name -> its default scale."""
    scales = {}
    for name, (path, scale) in loras.items():
        got = generator.load_lora(path, scale=0.0, adapter_name=name)
        scales[got] = float(scale)
    return scales


def attention_of(generator: VideoGenerator) -> tuple[str, float | None]:
    """(mode, sparsity) of the generator's self-attention (sparsity None when dense)."""
    attn = generator.attention
    return attn["mode"], (float(attn["sparsity"]) if attn["mode"] == "vsa" else None)


class Worker(threading.Thread):
    """Runs queued jobs on one generator until ``stop`` is set.

    wake: set when a job is submitted (an idle worker also polls every
    :data:`IDLE_POLL_S`). backend: the VSA kernel for per-job attention changes.
    loras: adapter name -> default scale, the adapters loaded into ``generator`` (all at
    scale 0 but the job's own: one adapter per job, or none).
    """

    def __init__(
        self,
        name: str,
        generator: VideoGenerator,
        store: JobStore,
        *,
        stop: threading.Event,
        wake: threading.Event,
        backend: str = "auto",
        loras: dict[str, float] | None = None,
    ) -> None:
        super().__init__(name=f"fastwan-serve-{name}", daemon=True)
        self.worker_name = name
        self.generator = generator
        self.store = store
        self.stop = stop
        self.wake = wake
        self.backend = backend
        # a multi-device generator: its devices joined, cuda:0+cuda:1
        self.device = "+".join(getattr(generator, "devices", None) or [str(generator.device)])
        self.job: str | None = None  # the id of the job it runs
        self._attention = attention_of(generator)
        self.loras = dict(loras or {})
        # adapter -> the scale it runs at; load_adapters leaves every one at 0
        self._lora_scales = dict.fromkeys(self.loras, 0.0)

    @property
    def healthy(self) -> bool:
        """The thread runs and so do the generator's processes (a multi-device one)."""
        return self.is_alive() and getattr(self.generator, "alive", True)

    def run(self) -> None:
        # the current device is per thread (a multi-device generator's are its processes')
        if self.generator.device.type == "cuda" and not hasattr(self.generator, "devices"):
            import torch

            torch.cuda.set_device(self.generator.device)
        while not self.stop.is_set():
            try:
                job = self.store.claim(self.worker_name)
            except Exception:  # a store hiccup (disk, lock): log it, keep serving
                logger.exception("worker %s: claiming a job failed", self.worker_name)
                self.stop.wait(1.0)
                continue
            if job is None:
                self.wake.wait(IDLE_POLL_S)
                self.wake.clear()
                continue
            self.job = job.id
            try:
                self.run_job(job)
            except Exception:  # never let one job end the worker
                logger.exception("worker %s: job %s", self.worker_name, job.id)
            finally:
                self.job = None

    def _set_attention(self, mode: str, sparsity: float | None) -> None:
        if (mode, sparsity) != self._attention:
            self.generator.set_attention(mode, sparsity=sparsity, backend=self.backend)
            self._attention = (mode, sparsity)

    def _set_lora(self, name: str | None, scale: float | None) -> None:
        """Adapter ``name`` at ``scale`` (default: its registered one), every other at 0."""
        want = dict.fromkeys(self.loras, 0.0)
        if name is not None and name not in self.loras:  # queued before a restart without it
            raise ValueError(
                f"lora {name!r} is not registered on this server (it has {sorted(self.loras)}); "
                "start it with --lora NAME=PATH to run this job"
            )
        if name is not None:
            want[name] = self.loras[name] if scale is None else float(scale)
        for adapter, value in want.items():
            if self._lora_scales.get(adapter) != value:
                self._lora_scales.pop(adapter, None)  # unknown if the call fails midway
                self.generator.set_lora_scale(value, adapter_name=adapter)
                self._lora_scales[adapter] = value

    def run_job(self, job: JobRecord) -> None:
        """Generate ``job`` (claimed, ``running``) and record how it ended."""
        from fastwan.video_io import save_video

        def on_step(info: dict) -> None:
            if self.stop.is_set():
                raise WorkerStopping
            if not self.store.progress(job.id, info["i"] + 1, info["total"]):
                raise JobCancelled

        path = self.store.video_path(job.id)
        try:
            if self.stop.is_set():
                raise WorkerStopping
            request = VideoRequest.model_validate(job.request)
            self._set_attention(job.attention, job.sparsity)
            self._set_lora(request.lora, request.lora_scale)
            out = self.generator.generate(**request.generate_kwargs(), callback=on_step)
            save_video(out.video, path, fps=out.fps)
        except JobCancelled:
            logger.info("job %s cancelled while running", job.id)
            return
        except WorkerStopping:
            self.store.requeue(job.id)
            logger.info("job %s re-queued: the server is stopping", job.id)
            return
        except Exception as err:  # the job fails; the worker goes on with the next one
            logger.warning("job %s failed:\n%s", job.id, traceback.format_exc())
            self.store.fail(job.id, _error_text(err))
            self._free_cuda_cache(err)
            return
        if not self.store.succeed(job.id, out.timings):  # cancelled after its last step
            path.unlink(missing_ok=True)

    def _free_cuda_cache(self, err: BaseException) -> None:
        # a multi-device generator's processes free their own
        if hasattr(self.generator, "devices"):
            return
        if self.generator.device.type == "cuda" and "out of memory" in str(err).lower():
            import torch

            torch.cuda.empty_cache()


def _error_text(err: BaseException) -> str:
    """What a failed job reports: a ValueError's message as is (it names the field and the
    fix), anything else with its type."""
    if isinstance(err, ValueError):
        return str(err)
    return f"{type(err).__name__}: {err}"
