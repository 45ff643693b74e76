"""Load on ``fastwan serve``: clips per second and latency against the number of workers.

For each worker count, a fresh ``fastwan serve`` process (the shipped toy student by
default, CPU workers: ``--devices cpu`` / ``cpu,cpu``, each with its share of the cores)
on a free loopback port and a new state folder; after a warm-up of two clips per worker,
``--clients`` client threads each keep one job in flight (submit, poll every 20 ms,
download the MP4) until ``--clips`` clips are done: a closed loop, so the queue never
overflows and every clip is counted. Latency is per clip, from the submit to the last byte
of the MP4 (``p50`` / ``p95``); ``server_s`` is the job's own time (created -> finished,
the queue wait included) and ``generate_s`` the mean of the generator's ``total`` timing.
Clips per second = clips / wall time of the measured loop.

    python benchmarks/serve_load.py --json benchmarks/results/serve_load_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

URL_LINE = re.compile(r"at (http://\S+) \(docs")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def start_server(model: str, workers: int, state_dir: Path, log: Path) -> tuple:
    cmd = [
        sys.executable, "-m", "fastwan.cli", "serve", model,
        "--devices", ",".join(["cpu"] * workers), "--port", "0",
        "--state-dir", str(state_dir), "--queue-size", "64", "--log-level", "warning",
    ]  # fmt: skip
    err = open(log, "w")  # noqa: SIM115 - the server's stderr, closed with it
    proc = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = URL_LINE.search(log.read_text())
        if match:
            return proc, err, match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"fastwan serve exited ({proc.returncode}):\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fastwan serve did not start within 300 s")


def one_clip(client: httpx.Client, seed: int, steps: int | None, timeout: float) -> dict:
    body = {"prompt": "a red ball moves right on a blue floor", "seed": seed}
    if steps is not None:
        body["num_inference_steps"] = steps
    t0 = time.perf_counter()
    r = client.post("/v1/videos", json=body)
    r.raise_for_status()
    job_id = r.json()["id"]
    while True:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            break
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.02)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
    video = client.get(job["content_url"])
    video.raise_for_status()
    return {
        "latency_s": time.perf_counter() - t0,
        "server_s": job["finished_at"] - job["created_at"],
        "generate_s": job["timings"]["total"],
        "bytes": len(video.content),
    }


def run_load(url: str, clips: int, clients: int, steps: int | None, timeout: float) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    counter = iter(range(clips))
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                with lock:
                    seed = next(counter, None)
                if seed is None:
                    return
                try:
                    row = one_clip(client, seed, steps, timeout)
                except Exception as err:  # reported, and the run fails
                    errors.append(repr(err))
                    return
                with lock:
                    results.append(row)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} clips failed: {errors[:3]}")
    latency = [r["latency_s"] for r in results]
    return {
        "clips": len(results),
        "wall_s": round(wall, 3),
        "clips_per_s": round(len(results) / wall, 3),
        "latency_p50_s": round(percentile(latency, 0.50), 3),
        "latency_p95_s": round(percentile(latency, 0.95), 3),
        "latency_mean_s": round(statistics.mean(latency), 3),
        "server_mean_s": round(statistics.mean(r["server_s"] for r in results), 3),
        "generate_mean_s": round(statistics.mean(r["generate_s"] for r in results), 3),
        "mp4_bytes_mean": round(statistics.mean(r["bytes"] for r in results)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-student")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--clips", type=int, default=24, help="measured clips per run")
    parser.add_argument("--clients", type=int, default=4, help="jobs kept in flight")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per clip")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    if args.clips < 1 or args.clients < 1 or any(c < 1 for c in counts):
        raise SystemExit("--clips, --clients and --workers must be >= 1")

    import torch

    runs = []
    for workers in counts:
        with tempfile.TemporaryDirectory() as tmp:
            proc, err, url = start_server(
                args.model, workers, Path(tmp) / "state", Path(tmp) / "log"
            )
            try:
                run_load(url, 2 * workers, workers, args.steps, args.timeout)  # warm-up
                row = {"workers": workers, **run_load(
                    url, args.clips, args.clients, args.steps, args.timeout
                )}  # fmt: skip
            finally:
                proc.terminate()
                proc.wait(60)
                err.close()
        runs.append(row)
        print(
            f"workers {workers}: {row['clips_per_s']:.2f} clips/s, latency p50 "
            f"{row['latency_p50_s']:.2f} s, p95 {row['latency_p95_s']:.2f} s "
            f"(generate {row['generate_mean_s']:.2f} s)",
            flush=True,
        )
    report = {
        "benchmark": "serve_load",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "model": args.model,
        "devices": "cpu",
        "clips": args.clips,
        "clients": args.clients,
        "steps": args.steps,
        "runs": runs,
        "speedup_clips_per_s": (
            round(runs[-1]["clips_per_s"] / runs[0]["clips_per_s"], 3) if len(runs) > 1 else None
        ),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
