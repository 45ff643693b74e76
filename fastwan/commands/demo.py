"""``fastwan demo`` (the toy world, end to end) and ``fastwan toy ...`` (rebuilding its
shipped weights: a fresh model folder, training clips, prompts, the probe)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastwan.choices import TOY_ROLES


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="sparse distillation end to end on the embedded toy world (CPU, minutes)",
        description=(
            "Teacher (50 steps, dense, CFG) vs the shipped 3-step VSA student on held-out "
            "prompts: speed, attribute accuracy, Frechet distance, diversity; then a short "
            "live sparse distillation from the teacher; then image to video (the toy I2V "
            "teacher and student given a first frame). Writes clips, plots and JSON."
        ),
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder (default %(default)s)")
    demo.add_argument("--quick", action="store_true", help="the CI-sized run (under 2 minutes)")
    demo.add_argument("--seeds", type=int, default=None, help="seeds per held-out prompt")
    demo.add_argument(
        "--live-steps", type=int, default=None, help="live distillation steps (0 skips it)"
    )
    demo.add_argument("--seed", type=int, default=0, help="base seed (default %(default)s)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.add_argument("--no-i2v", action="store_true", help="skip the image-to-video part (step 4)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_run_demo)

    toy = subparsers.add_parser("toy", help="rebuild the toy world's data and weights")
    sub = toy.add_subparsers(dest="toy_command", metavar="STEP", required=True)
    p = sub.add_parser("init", help="a fresh toy Wan folder with random weights")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--task", choices=("t2v", "ti2v"), default="t2v", help="ti2v: the image-to-video toy"
    )
    p.set_defaults(func=_run_init)
    p = sub.add_parser("clips", help="video shards of training clips (for the teacher)")
    p.add_argument("--model", required=True, help="a toy folder (its VAE and text encoder)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-clips", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=("t2v", "i2v"), default="t2v", help="i2v: i2v shards")
    p.set_defaults(func=_run_clips)
    p = sub.add_parser("prompts", help="text shards of training prompts (for distillation)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num-prompts", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--task", choices=("t2v", "i2v"), default="t2v", help="i2v: prompts with images")
    p.set_defaults(func=_run_prompts)
    p = sub.add_parser("ship", help="copy an exported teacher/student into fastwan's weights")
    p.add_argument("model", help="an exported toy folder (fastwan export ... --out DIR)")
    p.add_argument("--role", required=True, choices=TOY_ROLES)
    p.set_defaults(func=_run_ship)
    p = sub.add_parser("probe", help="train the attribute probe on rendered clips")
    p.add_argument("--out", required=True, help="safetensors file to write")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_probe)


def _threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _run_demo(args: argparse.Namespace) -> int:
    from fastwan.toy.demo import DemoSettings, run_demo

    _threads(args)
    settings = DemoSettings.make(
        args.out,
        quick=args.quick,
        seeds_per_prompt=args.seeds,
        live_steps=args.live_steps,
        seed=args.seed,
        i2v=not args.no_i2v,
        progress=not args.no_progress,
    )
    run_demo(settings)
    return 0


def _run_init(args: argparse.Namespace) -> int:
    from fastwan.toy.assets import build_toy_pipeline

    print(f"wrote {build_toy_pipeline(Path(args.out), seed=args.seed, task=args.task)}")
    return 0


def _run_clips(args: argparse.Namespace) -> int:
    from fastwan.toy.data import write_clip_dataset

    summary = write_clip_dataset(
        args.out, args.model, num_clips=args.num_clips, seed=args.seed, task=args.task
    )
    print(f"{summary['rows_total']} clips in {args.out}")
    return 0


def _run_prompts(args: argparse.Namespace) -> int:
    from fastwan.toy.data import write_prompt_dataset

    summary = write_prompt_dataset(
        args.out, args.model, num_prompts=args.num_prompts, seed=args.seed, task=args.task
    )
    print(f"{summary['rows_total']} prompts in {args.out}")
    return 0


def _run_probe(args: argparse.Namespace) -> int:
    from fastwan.toy.probe import train_probe

    accuracy = train_probe(args.out, steps=args.steps, seed=args.seed)
    print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return 0


def _run_ship(args: argparse.Namespace) -> int:
    from fastwan.toy.assets import ship_model

    print(f"shipped {args.model} as {ship_model(args.model, args.role)}")
    return 0
