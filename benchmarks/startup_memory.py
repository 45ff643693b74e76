"""Peak host memory per rank and start-up time of a sharded DMD build, 2 gloo processes.

The networks of ``fastwan train`` with ``train.method: dmd`` and no separate student /
critic folder -- the frozen teacher, and the student and critic copied from it -- are built
the way :func:`fastwan.train.build.build_trainer` builds them and sharded with FSDP2
(:func:`fastwan.distributed.parallelize.parallelize_method`, ``parallel.shard = 2``):

* ``before`` (the build of fastwan <= issue 16): every rank loads the teacher in full on
  the CPU, copies it twice and shards the three, the ranks of the node one after another
  (a barrier between turns), so each rank holds three full copies at its peak;
* ``after`` (meta-device build): the networks are built on the meta device, sharded, then
  each rank materialises only its own shards, read from the safetensors file.

The model is a ``WanTransformer3DModel`` with random weights, written by this script into a
temporary Diffusers-layout folder (``transformer/config.json`` + safetensors). Each mode
runs in two fresh processes (``torch.multiprocessing``, torchrun's environment), so the
peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``, the process's lifetime peak) is
that mode's own; ``peak - start`` subtracts the resident set before the build (torch,
diffusers and fastwan imported, the process group started). ``build_s``: from a barrier
before the build to one after it (the slowest rank). Ratios are ``after / before`` of the
same run. A checksum of every network's full weights (gathered after timing) shows both
modes built the same networks.

    python benchmarks/startup_memory.py --json benchmarks/results/startup_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("before", "after")


def _config(args: argparse.Namespace) -> dict:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=args.text_dim,
        freq_dim=256,
        ffn_dim=args.ffn_dim,
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def write_model(root: Path, config: dict, seed: int = 0) -> tuple[Path, int]:
    """A random ``WanTransformer3DModel`` saved under ``root/transformer``; its folder and
    its parameter count."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**config)
    tdir = root / "transformer"
    model.save_pretrained(str(tdir))
    return tdir, sum(p.numel() for p in model.parameters())


def _recipe(path: Path, out: Path):
    from fastwan.config import ModelConfig, ParallelConfig, Recipe, TrainConfig, VSAConfig

    return Recipe(
        model=ModelConfig(teacher=str(path), dtype="fp32", teacher_dtype="fp32"),
        train=TrainConfig(
            method="dmd",
            global_batch_size=2,
            mixed_precision="fp32",
            output_dir=str(out),
            report_to=[],
        ),  # fmt: skip
        parallel=ParallelConfig(world_size=2, shard=2),
        vsa=VSAConfig(sparsity=0.5, tile_size=(1, 2, 2), backend="torch"),
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _checksum(nets) -> float:
    from torch.distributed.tensor import DTensor

    total = 0.0
    for net in nets:
        for p in net.parameters():
            t = p.detach()
            total += float((t.full_tensor() if isinstance(t, DTensor) else t).double().sum())
    return total


def rank_main(mode: str, tdir: str, text_dim: int, out: str, result: str) -> None:
    """One rank: start the process group, build + shard the DMD networks, report."""
    import diffusers.models.transformers.transformer_wan  # noqa: F401 - imports are not the build
    import torch.distributed as dist

    from fastwan.distributed.mesh import destroy_parallel, init_parallel
    from fastwan.distributed.parallelize import parallelize_method
    from fastwan.methods.dmd import DMDMethod
    from fastwan.models.loading import load_transformer

    recipe = _recipe(Path(tdir), Path(out))
    state = init_parallel(recipe.parallel, "cpu")
    negative = torch.zeros(16, text_dim)
    rss_start = _rss_bytes()
    dist.barrier()
    t0 = time.perf_counter()

    def build(device: str):
        teacher = load_transformer(tdir, dtype=torch.float32, device=device)
        method = DMDMethod(teacher, recipe.dmd, recipe.vsa, negative)
        parallelize_method(method, state, recipe)
        return method

    if mode == "before":  # the ranks of the node in turns, each loading in full
        method = None
        for turn in range(state.world_size):
            if state.local_rank == turn:
                method = build("cpu")
            dist.barrier()
    else:
        method = build("meta")
        dist.barrier()
    build_s = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    rss_end = _rss_bytes()
    checksum = _checksum([method.teacher, method.student, method.critic])
    row = {
        "rank": state.rank,
        "build_s": build_s,
        "rss_before_build_bytes": rss_start,
        "rss_after_build_bytes": rss_end,
        "peak_rss_bytes": peak,
        "checksum": checksum,
    }
    Path(result).write_text(json.dumps(row))
    destroy_parallel()


def _entry(local_rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    mode, tdir, text_dim, out, result_dir = args
    rank_main(mode, tdir, text_dim, out, str(Path(result_dir) / f"{mode}-{local_rank}.json"))


def run_mode(mode: str, tdir: Path, text_dim: int, work: Path, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (mode, str(tdir), text_dim, str(work / f"out-{mode}"), str(work))
    t0 = time.perf_counter()
    mp.start_processes(_entry, args=(world, port, args), nprocs=world, start_method="spawn")
    wall = time.perf_counter() - t0
    rows = [json.loads((work / f"{mode}-{r}.json").read_text()) for r in range(world)]
    for row in rows:
        row["processes_wall_s"] = wall  # spawn, imports, build, checksum, teardown
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="benchmarks/startup_memory.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn-dim", type=int, default=4096)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    config = _config(args)
    with tempfile.TemporaryDirectory(prefix="fastwan-startup-") as tmp:
        work = Path(tmp)
        tdir, n_params = write_model(work, config)
        weights = sum(f.stat().st_size for f in tdir.glob("*.safetensors"))
        per_mode = {mode: run_mode(mode, tdir, args.text_dim, work) for mode in args.modes}
    result: dict = {
        "benchmark": "startup_memory",
        "networks": ["teacher", "student (copy)", "critic (copy)"],
        "world_size": 2,
        "backend": "gloo",
        "mesh": "shard 2 (FSDP2)",
        "dtype": "float32",
        "transformer_config": config,
        "parameters": n_params,
        "weights_bytes": weights,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, 1 thread per rank",
        "torch": torch.__version__,
        "modes": {},
    }
    for mode, rows in per_mode.items():
        result["modes"][mode] = {
            "ranks": rows,
            "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in rows),
            "peak_rss_minus_start_bytes_max": max(
                r["peak_rss_bytes"] - r["rss_before_build_bytes"] for r in rows
            ),
            "build_s": max(r["build_s"] for r in rows),
            "processes_wall_s": rows[0]["processes_wall_s"],
            "checksum": rows[0]["checksum"],
        }
    if set(per_mode) == set(MODES):
        b, a = result["modes"]["before"], result["modes"]["after"]
        result["after_over_before"] = {
            "peak_rss": a["peak_rss_bytes_max"] / b["peak_rss_bytes_max"],
            "peak_rss_minus_start": a["peak_rss_minus_start_bytes_max"]
            / b["peak_rss_minus_start_bytes_max"],
            "build_s": a["build_s"] / b["build_s"],
            "processes_wall_s": a["processes_wall_s"] / b["processes_wall_s"],
        }
        result["same_weights"] = abs(a["checksum"] - b["checksum"]) <= 1e-9 * max(
            1.0, abs(b["checksum"])
        )
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
