"""LoRA sparse distillation on the toy world: VSA gates trained in full vs low-rank, and
both against the full (non-LoRA) student, with the same recipe, steps and seed.

``recipes/toy_distill.yaml`` (data-free DMD2, VSA 0.75, 3 steps) runs from the shipped toy
teacher for ``--steps`` steps three times, built by :func:`fastwan.train.build.build_trainer`:

* ``full``: the recipe as it is (student and critic train in full);
* ``lora_gates_lora``: ``lora.rank = --rank`` on one shared base, the student's gates as a
  rank-r adapter (``lora.gates: lora``);
* ``lora_gates_full``: the same with the gate weights trained in full (``lora.gates: full``).

The LoRA runs use ``--lora-lr`` for both optimisers (adapters start at B = 0 and need a
larger step than whole networks; the full run keeps the recipe's 1e-4). Reported per run:
the generator and critic losses (mean of the last quarter of the updates), the trainable
parameter count, seconds per step, and the held-out evaluation of ``fastwan demo`` (the 12
combinations never trained on x ``--seeds`` seeds, the shipped probe): mean attribute
accuracy and Frechet distance of the student's 3-step VSA clips (the LoRA students merged
into plain weights first).

    python benchmarks/lora_toy.py --json benchmarks/results/lora_toy_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _mean_last(history: list[dict], key: str) -> float:
    values = [float(r[key]) for r in history if key in r]
    tail = values[-max(1, len(values) // 4) :]
    return float(np.mean(tail))


def run(name: str, overrides: list[str], data: Path, out: Path, steps: int) -> dict:
    from tqdm import tqdm

    from fastwan.config import load_recipe
    from fastwan.methods.base import prepare_network, trained_parameters
    from fastwan.models.lora import lora_layers, merge_lora
    from fastwan.toy.assets import toy_model_path
    from fastwan.train.build import build_trainer

    recipe = load_recipe(
        ROOT / "recipes" / "toy_distill.yaml",
        [
            f"model.teacher={toy_model_path('teacher')}",
            f"data.path={data}",
            f"train.output_dir={out / name}",
            f"train.max_steps={steps}",
            "train.ema_decay=null",
            "train.ema_start_step=0",
            "train.checkpoint_interval=0",
            "train.validation_interval=0",
            "train.report_to=[]",
            *overrides,
        ],
    )
    trainer = build_trainer(recipe, device="cpu", log_fn=lambda _l: None).trainer
    counts = {
        r: sum(p.numel() for p in trained_parameters(trainer.method, r).values())
        for r in trainer.networks
    }
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=name, unit="step"):
        trainer.train_step()
    seconds = time.perf_counter() - start
    student = copy.deepcopy(prepare_network(trainer.method, "generator"))
    if list(lora_layers(student)):
        merge_lora(student, "generator")
    weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return {
        "history": trainer.history,
        "weights": weights,
        "summary": {
            "generator_loss": _mean_last(trainer.history, "generator_loss"),
            "critic_loss": _mean_last(trainer.history, "critic_loss"),
            "trainable_params": counts,
            "sec_per_step": seconds / steps,
        },
    }


def evaluate(weights: dict[str, torch.Tensor], seeds: int) -> dict[str, float]:
    """Held-out accuracy and Frechet distance of the 3-step VSA student with ``weights``."""
    from fastwan.pipeline import VideoGenerator
    from fastwan.toy import world
    from fastwan.toy.metrics import real_clips, score_clips
    from fastwan.toy.probe import load_probe

    combos = sorted(world.HELD_OUT, key=world.canonical_prompt)
    rows = [c for c in combos for _ in range(seeds)]
    groups = [g for g in range(len(combos)) for _ in range(seeds)]
    prompts = [world.canonical_prompt(c) for c in rows]
    real_groups = [g for g in range(len(combos)) for _ in range(8)]
    real = real_clips([c for c in combos for _ in range(8)], seed=777)
    from fastwan.toy.assets import toy_model_path

    gen = VideoGenerator.from_pretrained(
        toy_model_path("teacher"), preset="toy-student", device="cpu"
    )
    gen.transformer.load_state_dict(weights)
    frames = gen.generate(prompts, seed=0).frames
    scores = score_clips(load_probe(), frames, rows, groups, real, real_groups)
    return {"accuracy": float(scores["accuracy_mean"]), "frechet": float(scores["frechet"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=4, help="clips per held-out prompt")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from fastwan.toy.assets import toy_model_path
    from fastwan.toy.data import write_prompt_dataset

    lora = [
        f"lora.rank={args.rank}",
        f"optim.generator.lr={args.lora_lr}",
        f"optim.critic.lr={args.lora_lr}",
    ]
    configs = {
        "full": [],
        "lora_gates_lora": [*lora, "lora.gates=lora"],
        "lora_gates_full": [*lora, "lora.gates=full"],
    }
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts"
        write_prompt_dataset(
            data, toy_model_path("teacher"), num_prompts=512, seed=1, progress=False
        )
        for name, overrides in configs.items():
            torch.manual_seed(0)
            out = run(name, overrides, data, Path(tmp), args.steps)
            results[name] = {**out["summary"], **evaluate(out["weights"], args.seeds)}
            results[name]["curve"] = [
                {k: r[k] for k in ("step", "generator_loss", "critic_loss") if k in r}
                for r in out["history"]
            ]
            print(name, {k: v for k, v in results[name].items() if k != "curve"})
    full_acc = results["full"]["accuracy"]
    for name in ("lora_gates_lora", "lora_gates_full"):
        results[name]["accuracy_vs_full"] = results[name]["accuracy"] / full_acc
    record = {
        "benchmark": "lora_toy",
        "steps": args.steps,
        "rank": args.rank,
        "lora_lr": args.lora_lr,
        "seeds_per_prompt": args.seeds,
        "machine": {
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "runs": results,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
