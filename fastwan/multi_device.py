"""One video on N devices: Ulysses sequence parallelism and CFG parallelism.

``VideoGenerator.from_pretrained(path, num_gpus=N)`` (``fastwan generate --num-gpus N``)
returns a :class:`MultiDeviceGenerator`: fastwan starts one worker process per device and
every worker loads the model and runs the same ``generate`` call in lockstep:

* **sequence parallel** (:mod:`fastwan.distributed.sequence_parallel`): each worker holds
  ``1 / sp`` of the latent tokens between attentions, and an all-to-all gives it the full
  sequence for ``heads / sp`` heads inside attention (dense or VSA);
* **CFG parallel** (``cfg_parallel=True``, the default for an even N): when a call uses
  classifier-free guidance, the first N / 2 workers run the conditional branch and the
  others the unconditional one, each branch sequence-parallel over N / 2 workers, and one
  all-gather per step combines them (``v_u + w (v_c - v_u)``, as on one device); a call
  without CFG (FastWan's DMD) spreads its tokens over all N;
* **FSDP inference** (``fsdp=True``): the transformer's weights are sharded over the N
  workers (FSDP2, built on the meta device so no worker ever holds a full copy) and
  gathered block by block: a model that does not fit one device runs on several.

Under ``torchrun --nproc-per-node N`` the launched processes are the workers (no process
is started); every rank returns the video. Results equal one device's up to float
rounding (tested on CPU with gloo, 2 processes against 1).

What a server's worker needs of a generator works here too (``fastwan serve
--devices-per-worker N``): ``devices=`` chooses which devices the processes take;
``check_inputs`` runs in the calling process on the model without its weights
(:func:`fastwan.inputs.input_checker`), so a request is checked without waiting for a
running video; ``set_attention`` and the LoRA methods run on every worker; and a
``callback`` that raises stops the call at that step on every worker alike (rank 0 asks,
one broadcast per step agrees), so the workers stay in step for the next call.
"""

from __future__ import annotations

import os
import socket
import threading
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["MultiDeviceGenerator", "check_devices", "check_num_gpus", "cfg_parallel_guidance"]

_READY, _DONE, _ERROR, _PROGRESS, _CANCELLED = "ready", "done", "error", "progress", "cancelled"
# The VideoGenerator methods every worker runs on a request of the parent (besides generate).
_BROADCAST_METHODS = ("set_attention", "load_lora", "set_lora_scale", "unload_lora")


class _Stopped(Exception):
    """Raised on every worker at the same step: the parent's callback raised."""


def check_num_gpus(num_gpus: Any, num_heads: int, *, cfg_parallel: bool = True) -> None:
    """A ValueError naming the fix when ``num_gpus`` cannot split a model of ``num_heads``
    attention heads (sequence parallelism gives each device ``heads / sp`` heads)."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus must be an int >= 1, got {num_gpus!r}")
    sizes = [num_gpus] + ([num_gpus // 2] if cfg_parallel and num_gpus % 2 == 0 else [])
    for size in sizes:
        if num_heads % size:
            good = [d for d in range(1, 2 * num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"num_gpus={num_gpus}: the model's {num_heads} attention heads do not divide "
                f"over {size} devices (sequence parallelism splits heads); use num_gpus in "
                f"{good}" + (" or cfg_parallel=False" if size != num_gpus else "")
            )


def cfg_parallel_guidance(group: Any, branch: int) -> Callable:
    """A ``guidance(cond_fn, uncond_fn, scale) -> model_fn`` for
    :func:`fastwan.pipeline.denoise`: this worker computes branch 0 (conditional) or 1
    (unconditional); one all-gather over ``group`` (one worker of each branch, branch 0
    first) gives both, combined as :func:`fastwan.diffusion.samplers.cfg` does."""

    def guidance(cond_fn: Callable, uncond_fn: Callable, scale: float) -> Callable:
        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = (cond_fn if branch == 0 else uncond_fn)(x, t).contiguous()  # [B, C, T, h, w]
            both = [torch.empty_like(v) for _ in range(2)]
            dist.all_gather(both, v, group=group)
            v_c, v_u = both
            return v_u + scale * (v_c - v_u)

        return guided

    return guidance


class _Layout:
    """The process groups of one worker: all N for sequence parallelism, or (CFG parallel)
    two halves of N / 2 and the pairs that exchange their branches."""

    def __init__(self, world: int, rank: int, cfg_parallel: bool) -> None:
        self.world, self.rank = world, rank
        self.all = dist.group.WORLD
        self.cfg = cfg_parallel and world % 2 == 0 and world >= 2
        self.half = self.pair = None
        if self.cfg:
            h = world // 2
            for ranks in (list(range(h)), list(range(h, world))):  # every rank creates each
                g = dist.new_group(ranks)
                if rank in ranks:
                    self.half = g
            for i in range(h):
                g = dist.new_group([i, i + h])
                if rank in (i, i + h):
                    self.pair = g
            self.branch = rank // h


def _device_for(name: str) -> torch.device:
    """The worker's device (``cpu``, ``cuda:3``), made current for a CUDA one."""
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def check_devices(devices: Sequence[str], num_gpus: int) -> tuple[str, ...]:
    """``devices`` as one torch device name per worker (``cuda:0``, ``cpu``), or a
    ValueError naming the fix: one per process, all CPU or all distinct CUDA devices."""
    if isinstance(devices, str):
        devices = [devices]
    try:
        names = tuple(str(torch.device(d)) for d in devices)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"devices must be torch device names (cuda:0, cpu), got {devices!r}"
        ) from None
    if len(names) != num_gpus:
        raise ValueError(
            f"devices has {len(names)} entries for num_gpus={num_gpus}: pass one per process"
        )
    types = {torch.device(n).type for n in names}
    if types == {"cpu"}:
        return names
    if types != {"cuda"} or any(torch.device(n).index is None for n in names):
        raise ValueError(
            f"devices must be all CPU or all indexed CUDA devices (cuda:0, cuda:1), got {names}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"devices lists a CUDA device twice: {names}; each process needs its own")
    count = torch.cuda.device_count()
    missing = [n for n in names if torch.device(n).index >= count]
    if missing:
        raise ValueError(f"devices {missing} do not exist ({count} CUDA devices are visible)")
    return names


def _load_worker_generator(load: dict, device: torch.device, fsdp: bool):
    from fastwan.pipeline import VideoGenerator

    if not fsdp:
        return VideoGenerator.from_pretrained(load.pop("path"), device=device, **load)
    return _load_sharded(load, device)


def _load_sharded(load: dict, device: torch.device):
    """The generator with its transformer built on the meta device, sharded over all
    workers by FSDP2 and filled with each worker's own shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastwan.choices import parse_dtype
    from fastwan.distributed.parallelize import materialize
    from fastwan.models.loading import load_components
    from fastwan.models.vsa import transformer_blocks
    from fastwan.pipeline import VideoGenerator, apply_attention, default_dtype

    dtype = load.get("dtype")
    dtype = default_dtype(device) if dtype is None else parse_dtype(dtype)
    components = load_components(
        load["path"],
        preset=load.get("preset"),
        dtype=dtype,
        vae_dtype=parse_dtype(load.get("vae_dtype") or torch.float32, field="vae_dtype"),
        strict=load.get("strict", False),
        transformer_device="meta",
    )
    net = components.transformer
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in transformer_blocks(net):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(net, mesh=mesh, reshard_after_forward=True)
    materialize(net, device)
    apply_attention(
        components,
        load.get("attention"),
        load.get("sparsity"),
        load.get("tile_size"),
        load.get("backend", "auto"),
    )
    return VideoGenerator(components, device=device, vae_tiling=load.get("vae_tiling", False))


def _uses_cfg(gen: Any, kwargs: dict) -> bool:
    """Whether a call runs classifier-free guidance: its guidance scale (else the model's)
    over 1. No other check here: ``generate`` checks every argument itself, once."""
    scale = kwargs.get("guidance_scale")
    scale = gen.preset.guidance_scale if scale is None else scale
    return isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 1.0


def _run_on_rank(gen: Any, layout: _Layout, kwargs: dict) -> Any:
    """One ``generate`` call on this worker, sequence- and CFG-parallel."""
    from fastwan.distributed.sequence_parallel import (
        disable_sequence_parallel,
        enable_sequence_parallel,
    )

    use_cfg = layout.cfg and _uses_cfg(gen, kwargs)
    group = layout.half if use_cfg else layout.all
    size = dist.get_world_size(group)
    if size > 1:
        enable_sequence_parallel(gen.transformer, group)
    else:
        disable_sequence_parallel(gen.transformer)
    gen.guidance = cfg_parallel_guidance(layout.pair, layout.branch) if use_cfg else None
    return gen.generate(**kwargs)


def _worker(
    rank: int,
    world: int,
    port: int,
    device_name: str,
    load: dict,
    cfg_parallel: bool,
    fsdp: bool,
    requests: Any,
    results: Any,
    stop: Any,
) -> None:
    """A worker process: join the group, load the model, then serve the parent's requests
    (``None`` stops it). Rank 0 reports progress and returns the results."""
    try:
        device = _device_for(device_name)
        if device.type == "cpu":  # the processes share the cores, each its part
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=30),
        )
        gen = _load_worker_generator(dict(load), device, fsdp)
        layout = _Layout(world, rank, cfg_parallel)
        results.put((_READY, rank, gen.attention if rank == 0 else None))
    except Exception as err:  # noqa: BLE001 -- reported to the parent, which raises it
        results.put((_ERROR, rank, _portable(err)))
        return
    while True:
        request = requests.get()
        if request is None:
            break
        op, args, kwargs = request
        try:
            if op == "generate":
                out = _run_on_rank(gen, layout, _worker_callback(kwargs, gen, rank, results, stop))
                results.put((_DONE, rank, out if rank == 0 else None))
            else:  # one of _BROADCAST_METHODS: every rank changes its copy alike
                value = getattr(gen, op)(*args, **kwargs)
                results.put((_DONE, rank, (value, gen.attention) if rank == 0 else None))
        except _Stopped:
            results.put((_CANCELLED, rank, None))
        except Exception as err:  # noqa: BLE001
            if device.type == "cuda" and "out of memory" in str(err).lower():
                torch.cuda.empty_cache()  # the next call gets the memory back
            results.put((_ERROR, rank, _portable(err)))
    dist.destroy_process_group()


def _worker_callback(kwargs: dict, gen: Any, rank: int, results: Any, stop: Any) -> dict:
    """``kwargs`` with this worker's step callback: rank 0 reports each step; with
    ``stoppable`` (the parent has a callback that may raise) every rank then learns from
    rank 0 whether to stop, so all stop after the same step."""
    stoppable = kwargs.pop("stoppable", False)

    def on_step(info: dict) -> None:
        if rank == 0:
            results.put((_PROGRESS, 0, {k: info[k] for k in ("i", "total", "t")}))
        if stoppable:
            flag = torch.tensor([int(rank == 0 and stop.is_set())], device=gen.device)
            dist.broadcast(flag, src=0)  # one int per step; every rank reads rank 0's
            if flag.item():
                raise _Stopped

    if rank == 0 or stoppable:
        kwargs["callback"] = on_step
    return kwargs


def _portable(err: BaseException) -> BaseException:
    """``err`` if it pickles (ValueErrors keep their type for the caller), else a
    RuntimeError with its traceback."""
    import pickle

    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError("".join(traceback.format_exception(err)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiDeviceGenerator:
    """``VideoGenerator.generate`` on ``num_gpus`` devices (see the module docstring).

    The workers start in ``__init__`` and stop with :meth:`close` (or ``with``). ``generate``
    takes :meth:`VideoGenerator.generate`'s arguments except ``callback_on_step_end`` (the
    latents live in the workers); ``callback`` sees ``{"i", "total", "t"}`` per step, and
    an exception it raises stops the call on every worker after that step (then
    ``generate`` raises it; the generator serves the next call). devices: the device of
    each process (default ``cuda:0`` ... or ``cpu``); calls are serialised (one at a time).
    """

    def __init__(
        self,
        path_or_id: str,
        num_gpus: int,
        *,
        device: str | None = None,
        devices: Sequence[str] | None = None,
        cfg_parallel: bool = True,
        fsdp: bool = False,
        **load: Any,
    ) -> None:
        from fastwan.inputs import input_checker
        from fastwan.models.loading import identify_folder

        if fsdp and (load.get("compile") or load.get("cpu_offload")):
            on = "compile" if load.get("compile") else "cpu_offload"
            raise ValueError(
                f"{on}={load[on]!r} is not supported with fsdp=True (the sharded transformer "
                f"is neither compiled nor offloaded); pass {on}=False, or fsdp=False (each "
                "device then holds the whole model)"
            )
        path, identity = identify_folder(path_or_id, preset=load.get("preset"))
        check_num_gpus(num_gpus, identity.preset.num_heads, cfg_parallel=cfg_parallel)
        if devices is None:
            device_type = torch.device(
                device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            ).type
            if device_type == "cuda" and torch.cuda.device_count() < num_gpus:
                raise ValueError(
                    f"num_gpus={num_gpus} but {torch.cuda.device_count()} CUDA devices are "
                    "visible; pass a smaller num_gpus (or set CUDA_VISIBLE_DEVICES)"
                )
            devices = [f"cuda:{i}" if device_type == "cuda" else "cpu" for i in range(num_gpus)]
        elif device is not None:
            raise ValueError(
                "pass device= (a type: the first num_gpus devices) or devices=, not both"
            )
        self.devices = check_devices(devices, num_gpus)
        self.device = torch.device(self.devices[0])  # rank 0's, which returns the results
        self.num_gpus, self.cfg_parallel, self.fsdp = num_gpus, cfg_parallel, fsdp
        self.identity = identity
        from fastwan.models.compile import parse_compile

        # as VideoGenerator reports them (each worker applies them to its own copy)
        self.compile_backend = parse_compile(load.get("compile"))
        self.vae_tiling = bool(load.get("vae_tiling", False))
        self._workers: list = []
        self._in_process = None
        self._lock = threading.Lock()  # one call at a time through the queues
        self._attention: dict = {}
        load = dict(load, path=str(path))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # torchrun: this process is one of the workers
            if world != num_gpus:
                raise ValueError(
                    f"num_gpus={num_gpus} but torchrun started {world} processes; pass "
                    f"num_gpus={world}"
                )
            self._in_process = self._join_torchrun(load, self.device.type)
            self._checker = self._in_process[0]  # the loaded model checks its own inputs
            return
        # The parent holds no weights: requests are checked on the weightless model.
        self._checker = input_checker(
            path, preset=load.get("preset"), strict=load.get("strict", False)
        )
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = _free_port()
        self._results = ctx.Queue()
        self._stop = ctx.Event()  # set: the workers stop the running call at the next step
        self._requests = [ctx.Queue() for _ in range(num_gpus)]
        for rank in range(num_gpus):
            args = (rank, num_gpus, port, self.devices[rank], load, cfg_parallel, fsdp)
            proc = ctx.Process(
                target=_worker,
                args=(*args, self._requests[rank], self._results, self._stop),
                daemon=True,
            )
            proc.start()
            self._workers.append(proc)
        self._attention = self._collect(_READY)

    def _join_torchrun(self, load: dict, device_type: str):
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        name = "cpu" if device_type == "cpu" else f"cuda:{local % torch.cuda.device_count()}"
        device = _device_for(name)
        self.device = device
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        gen = _load_worker_generator(dict(load), device, self.fsdp)
        return gen, _Layout(dist.get_world_size(), rank, self.cfg_parallel)

    # ----------------------------------------------------------------- the model
    @property
    def preset(self):
        return self.identity.preset

    @property
    def task(self) -> str:
        return self.identity.task

    @property
    def components(self):
        """The loaded folder's components as :attr:`VideoGenerator.components` (here the
        weightless ones: ``path``, ``preset``, configs; the weights live in the workers)."""
        if self._in_process is not None:
            return self._in_process[0].components
        return self._checker.components

    @property
    def sampling_sources(self) -> dict[str, str]:
        """Where each sampling default came from, as :attr:`VideoGenerator.sampling_sources`."""
        return dict(self.components.sampling_sources)

    @property
    def transformer(self):
        """The weightless transformer (meta device): its config, not its weights."""
        return self._checker.transformer

    @property
    def attention(self) -> dict:
        """The workers' self-attention setting (``mode``, ``sparsity``, ...), as
        :attr:`VideoGenerator.attention` gives it."""
        if self._in_process is not None:
            return self._in_process[0].attention
        return dict(self._attention)

    @property
    def alive(self) -> bool:
        """Whether every worker process runs (False once closed or one died)."""
        if self._in_process is not None:
            return True
        return bool(self._workers) and all(p.is_alive() for p in self._workers)

    def check_inputs(self, *args: Any, **kwargs: Any) -> dict:
        """:meth:`VideoGenerator.check_inputs` in this process, without the workers: a
        request is checked while a video is being made."""
        return self._checker.check_inputs(*args, **kwargs)

    def default_size_for_image(self, image: Any) -> tuple[int, int]:
        return self._checker.default_size_for_image(image)

    # ----------------------------------------------------------------- every worker
    def _broadcast(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Run method ``op`` on every worker's generator; rank 0's return value."""
        if self._in_process is not None:
            return getattr(self._in_process[0], op)(*args, **kwargs)
        with self._lock:
            self._check_open()
            for q in self._requests:
                q.put((op, args, kwargs))
            value, self._attention = self._collect(_DONE)
        return value

    def set_attention(
        self,
        mode: str,
        *,
        sparsity: float | None = None,
        tile_size: Sequence[int] | None = None,
        backend: str = "auto",
    ) -> None:
        """:meth:`VideoGenerator.set_attention` on every worker."""
        self._broadcast(
            "set_attention", mode, sparsity=sparsity, tile_size=tile_size, backend=backend
        )

    def load_lora(self, path: str, scale: float = 1.0, adapter_name: str | None = None) -> str:
        """:meth:`VideoGenerator.load_lora` on every worker (each reads the file); the
        adapter's name."""
        return self._broadcast("load_lora", str(path), scale=scale, adapter_name=adapter_name)

    def set_lora_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """:meth:`VideoGenerator.set_lora_scale` on every worker."""
        self._broadcast("set_lora_scale", scale, adapter_name=adapter_name)

    def unload_lora(self, adapter_name: str | None = None) -> None:
        """:meth:`VideoGenerator.unload_lora` on every worker."""
        self._broadcast("unload_lora", adapter_name=adapter_name)

    def _check_open(self) -> None:
        if not self._workers:
            raise ValueError("this generator is closed (or a worker died): load it again")

    def _collect(self, kind: str, callback: Callable | None = None) -> Any:
        """Wait for every worker's answer to the current request; the first error is
        raised (after all workers answered, so none is left mid-call). An exception from
        ``callback`` asks the workers to stop at their next step and is raised once they
        all stopped (or finished)."""
        answered, result, error, raised = 0, None, None, None
        while answered < self.num_gpus:
            try:
                what, rank, payload = self._results.get(timeout=5.0)
            except Exception:  # noqa: BLE001 -- queue.Empty: check the workers are alive
                dead = [i for i, p in enumerate(self._workers) if not p.is_alive()]
                if dead:
                    codes = [self._workers[i].exitcode for i in dead]
                    self.close()
                    raise RuntimeError(
                        f"worker process(es) {dead} exited (exit codes {codes}); see their "
                        "output above"
                    ) from None
                continue
            if what == _PROGRESS:
                if callback is not None and raised is None:
                    try:
                        callback(payload)
                    except BaseException as exc:  # noqa: BLE001 -- re-raised below
                        raised = exc
                        self._stop.set()
                continue
            answered += 1
            if what == _ERROR and error is None:
                error = payload
            elif what != _ERROR and rank == 0:
                result = payload
        self._stop.clear()
        if raised is not None:
            raise raised
        if error is not None:
            if kind == _READY:
                self.close()
            raise error
        return result

    def generate(self, prompt: Any = None, negative_prompt: Any = None, **kwargs: Any) -> Any:
        """:meth:`fastwan.pipeline.VideoGenerator.generate` on the devices; the result
        (frames on the CPU) as one device would return it."""
        if kwargs.get("callback_on_step_end") is not None:
            raise ValueError(
                "callback_on_step_end is not available with num_gpus > 1 (the latents live "
                "in the worker processes); use callback= for progress"
            )
        callback = kwargs.pop("callback", None)
        kwargs.update(prompt=prompt, negative_prompt=negative_prompt)
        if self._in_process is not None:
            gen, layout = self._in_process
            return _run_on_rank(gen, layout, dict(kwargs, callback=callback))
        self._check_open()
        # Checked here once (a ValueError before any worker is busy); the images go to the
        # workers loaded, so no file is read twice.
        plan = self._checker.check_inputs(**kwargs)
        for key in ("image", "last_image"):
            if kwargs.get(key) is not None:
                kwargs[key] = plan[key]
        with self._lock:
            self._check_open()
            for q in self._requests:
                q.put(("generate", (), dict(kwargs, stoppable=callback is not None)))
            return self._collect(_DONE, callback)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for q in getattr(self, "_requests", []):
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for proc in self._workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
        self._workers = []

    def __enter__(self) -> MultiDeviceGenerator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover -- best effort at interpreter exit
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
