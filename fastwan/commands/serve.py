"""``fastwan serve MODEL``: an HTTP API with a durable job queue (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fastwan.commands.generate import add_compile_argument, finite_float

API_KEY_ENV = "FASTWAN_API_KEY"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP API: queue text/image-to-video jobs, poll them, download the MP4s",
        description=(
            "Serve MODEL over HTTP: POST /v1/videos queues a job, GET /v1/videos/ID shows "
            "its progress, GET /v1/videos/ID/content is the MP4, DELETE cancels; /health, "
            "/metrics (Prometheus), /docs (OpenAPI). Jobs and videos live in --state-dir, so "
            "a restart runs what was queued. Binds to 127.0.0.1 unless --host says otherwise "
            f"(then --api-key, or ${API_KEY_ENV}, is required)."
        ),
    )
    p.add_argument("model", help="pipeline folder, hub repo id or preset name (e.g. toy-student)")
    p.add_argument("--preset", default=None, help="the model's preset (default: recognised)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free port")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"bearer token clients must send (default: ${API_KEY_ENV}); required off loopback",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("fastwan-serve"),
        help="jobs database and videos (default ./fastwan-serve); reuse it to keep the queue",
    )
    p.add_argument(
        "--devices",
        default=None,
        help="cpu, or CUDA indices such as 0,1,2,3 (default: every CUDA device, else cpu); "
        "cpu,cpu runs two CPU workers",
    )
    p.add_argument(
        "--devices-per-worker",
        type=int,
        default=1,
        help="devices each worker spans: one video on N devices (sequence / CFG parallel, "
        "one process per device); default 1",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH[:SCALE]",
        help="register a LoRA adapter (a .safetensors file or LoRA folder) that requests "
        "choose by NAME (field lora; lora_scale overrides SCALE, default 1); repeatable",
    )
    p.add_argument(
        "--queue-size", type=int, default=16, help="jobs that may wait before 429 (default 16)"
    )
    p.add_argument(
        "--ttl",
        type=finite_float,
        default=3600.0,
        help="seconds a finished job's video is kept (default 3600)",
    )
    p.add_argument(
        "--vsa-backend", default="auto", choices=("auto", "torch", "triton", "flex", "reference")
    )
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on CUDA)")
    p.add_argument(
        "--cpu-offload", action="store_true", help="move each component to the GPU per stage"
    )
    add_compile_argument(
        p, "torch.compile each transformer block (the first job at a new size pays a compile)"
    )
    p.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles")
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    p.set_defaults(func=run)


def default_devices() -> str:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ",".join(str(i) for i in range(count)) if count else "cpu"


def run(args: argparse.Namespace) -> int:
    from fastwan.serve.app import Server, check_bind
    from fastwan.serve.runtime import ServeOptions, parse_lora
    from fastwan.serve.worker import parse_devices

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    check_bind(args.host, args.port, api_key)  # before any weight loads
    if args.queue_size < 1:
        raise ValueError(f"--queue-size must be >= 1, got {args.queue_size}")
    if args.ttl <= 0:
        raise ValueError(f"--ttl must be > 0 seconds, got {args.ttl:g}")
    loras: dict[str, tuple[str, float]] = {}
    for spec in args.lora:
        name, path, scale = parse_lora(spec)
        if name in loras:
            raise ValueError(f"--lora {name} is given twice; each adapter needs its own NAME")
        loras[name] = (path, scale)
    devices = args.devices if args.devices is not None else default_devices()
    cuda_count = None
    if devices.replace(",", "").replace("cpu", "").strip():  # CUDA indices: check them now
        import torch

        cuda_count = torch.cuda.device_count()
    groups = parse_devices(devices, args.devices_per_worker, cuda_count=cuda_count)
    if groups[0] == ("cpu",):
        import torch

        # CPU workers share the cores: each gets its part, not every core each (the
        # processes of a multi-device worker set their own).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(groups)))
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServeOptions(
        model=args.model,
        state_dir=args.state_dir,
        devices=devices,
        devices_per_worker=args.devices_per_worker,
        queue_size=args.queue_size,
        ttl=args.ttl,
        loras=loras,
        load_options=dict(
            preset=args.preset,
            backend=args.vsa_backend,
            dtype=args.dtype,
            cpu_offload=args.cpu_offload,
            compile=args.compile or False,
            vae_tiling=args.vae_tiling,
        ),
    )
    shown = ", ".join("+".join(g) for g in groups)
    print(
        f"fastwan serve: loading {args.model} on {len(groups)} worker(s): {shown}", file=sys.stderr
    )
    server = Server(
        options, host=args.host, port=args.port, api_key=api_key, log_level=args.log_level
    )
    print(
        f"fastwan serve: {server.runtime.model_name} at {server.url} (docs: {server.url}/docs); "
        f"state in {args.state_dir}; Ctrl+C or SIGTERM to stop",
        file=sys.stderr,
    )
    server.run()
    print("fastwan serve: stopped; unfinished jobs stay queued in the state dir", file=sys.stderr)
    return 0
