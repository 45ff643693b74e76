"""Per-step losses of the toy recipes (recipes/toy_distill.yaml, recipes/toy_teacher.yaml)
for a few steps on 1 and 2 processes: the behaviour that refactors must keep.

    python tests/toy_recipe_losses.py record   # writes tests/data/toy_recipe_losses.json

``tests/test_toy_recipe_losses.py`` runs the same and compares with the recorded file:
bit-identical on the machine that recorded it (same torch, same CPU capability), within
float tolerance elsewhere (other SIMD widths change the last bits).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).parent / "data" / "toy_recipe_losses.json"
STEPS = 3
LOSS_KEYS = ("generator_loss", "critic_loss", "loss", "flow_loss")
CASES = ("toy_distill", "toy_teacher")  # x world 1, 2


def fingerprint() -> dict[str, str]:
    """What decides the last bits of CPU float math here."""
    return {
        "torch": torch.__version__.split("+")[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def _overrides(case: str, data: Path, out: Path, world: int) -> list[str]:
    from fastwan.toy.assets import toy_model_path

    batch = 4
    common = [
        f"model.teacher={toy_model_path('teacher')}",
        f"data.path={data}",
        f"train.output_dir={out}",
        f"train.max_steps={STEPS}",
        f"train.global_batch_size={batch}",
        f"train.micro_batch_size={batch // world}",
        "train.checkpoint_interval=0",
        "train.validation_interval=0",
        "train.log_interval=1",
        "train.report_to=[]",
        f"parallel.world_size={world}",
        f"parallel.shard={world}",  # FSDP2 over the ranks
        "train.ema_start_step=1",  # the EMA update runs within the few steps
        "optim.generator.warmup_steps=2",  # the LR schedule moves within the few steps
    ]
    if case == "toy_distill":  # a second generator update (step 3) after the critic moved
        common.append("dmd.generator_update_interval=2")
    return common


def _datasets(root: Path) -> dict[str, Path]:
    from fastwan.toy.assets import toy_model_path
    from fastwan.toy.data import write_clip_dataset, write_prompt_dataset

    teacher = toy_model_path("teacher")
    paths = {"toy_distill": root / "prompts", "toy_teacher": root / "clips"}
    if not paths["toy_distill"].exists():
        write_prompt_dataset(paths["toy_distill"], teacher, num_prompts=32, seed=1, progress=False)
    if not paths["toy_teacher"].exists():
        write_clip_dataset(paths["toy_teacher"], teacher, num_clips=32, seed=0, progress=False)
    return paths


def _losses(history: list[dict]) -> list[dict[str, float]]:
    return [{k: float(r[k]) for k in LOSS_KEYS if k in r} for r in history]


def run_case(case: str, data: Path, out: Path, world: int, result: Path) -> None:
    """One rank: build the recipe's trainer, train STEPS steps, rank 0 writes the losses."""
    from fastwan.config import load_recipe
    from fastwan.train.build import build_trainer

    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes" / f"{case}.yaml", _overrides(case, data, out, world))
    setup = build_trainer(recipe, device="cpu", log_fn=lambda _line: None)
    trainer = setup.trainer
    for _ in range(STEPS):
        trainer.train_step()
    if int(os.environ.get("RANK", "0")) == 0:
        result.write_text(json.dumps(_losses(trainer.history)))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank tears down while another is still in a collective
        dist.destroy_process_group()


def _rank_entry(local_rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    run_case(*args)


def measure(workdir: Path) -> dict[str, list[dict[str, float]]]:
    """``{"<case>/world<N>": [per-step losses]}`` for every case, 1 and 2 processes (each
    process single-threaded, so 1 and 2 processes do the same math per rank)."""
    import socket

    import torch.multiprocessing as mp

    data = _datasets(workdir / "data")
    out: dict[str, list[dict[str, float]]] = {}
    for case in CASES:
        for world in (1, 2):
            result = workdir / f"{case}-{world}.json"
            run_dir = workdir / f"run-{case}-{world}"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            args = (case, data[case], run_dir, world, result)
            mp.start_processes(
                _rank_entry, args=(world, port, args), nprocs=world, start_method="spawn"
            )
            out[f"{case}/world{world}"] = json.loads(result.read_text())
    return out


def main(argv: list[str]) -> None:
    if argv != ["record"]:
        raise SystemExit("usage: python tests/toy_recipe_losses.py record")
    with tempfile.TemporaryDirectory() as tmp:
        losses = measure(Path(tmp))
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"fingerprint": fingerprint(), "losses": losses}, indent=1))
    print(f"wrote {RECORD}")


if __name__ == "__main__":
    main(sys.argv[1:])
