"""``fastwan plan``: per-GPU memory of a recipe on a cluster, from configs only (no weights).

Exit status: 0 when the recipe fits with its ``parallel.activation_checkpointing``, 1 when
it does not (``--no-fail`` always exits 0), 2 on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastwan.commands.train import parse_trailing_overrides


def _add_options(p: argparse.ArgumentParser) -> None:
    # Not argparse-required: given after the recipe they arrive with the overrides.
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (required)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (required)")
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="memory of one GPU in GB (GiB), e.g. 80 for H100, 141 for H200 (required)",
    )
    p.add_argument(
        "--overhead-gb",
        type=float,
        default=4.0,
        help="fixed per-GPU overhead: CUDA context, NCCL buffers, fragmentation (default 4)",
    )
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when it does not fit")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="estimate per-GPU memory of a training recipe and say whether it fits",
        description=(
            "Estimate per-GPU memory (parameters, gradients, AdamW states, activations with "
            "and without checkpointing) of the student, critic and teacher of a recipe under "
            "its parallel layout (replicate x shard x sequence_parallel) on NODES x GPUS "
            "GPUs, from the models' configs (presets or local folders; no weights are "
            "read). Exit 1 when it does not fit. Recipe fields can be overridden with "
            "--section.key=VALUE, e.g. --parallel.shard=8."
        ),
    )
    p.add_argument("recipe", type=Path, help="YAML recipe (see recipes/)")
    _add_options(p)
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="recipe overrides --section.key=VALUE (e.g. --parallel.shard=8)",
    )
    p.set_defaults(func=run_plan)


def _split_overrides(args: argparse.Namespace) -> list[str]:
    """Options given after the recipe land in ``args.overrides``: parse them into ``args``;
    what is left must be ``--section.key=VALUE``."""
    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in ("--nodes", "--gpus-per-node"):
        options.add_argument(action, type=int, default=argparse.SUPPRESS)
    for action in ("--gpu-memory-gb", "--overhead-gb"):
        options.add_argument(action, type=float, default=argparse.SUPPRESS)
    options.add_argument("--no-fail", action="store_true", default=argparse.SUPPRESS)
    return parse_trailing_overrides(options, args, "--parallel.shard=8")


def run_plan(args: argparse.Namespace) -> int:
    from fastwan.config import load_recipe
    from fastwan.plan import plan_recipe, smallest_fitting_shard

    overrides = _split_overrides(args)
    missing = [
        flag
        for flag, value in (
            ("--nodes", args.nodes),
            ("--gpus-per-node", args.gpus_per_node),
            ("--gpu-memory-gb", args.gpu_memory_gb),
        )
        if value is None
    ]
    if missing:
        raise ValueError(
            f"missing {', '.join(missing)}; e.g. --nodes 8 --gpus-per-node 8 --gpu-memory-gb 141"
        )
    recipe = load_recipe(args.recipe, overrides)
    kwargs = dict(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gb=args.gpu_memory_gb,
        overhead_gb=args.overhead_gb,
    )
    plan = plan_recipe(recipe, **kwargs)
    lay, d = plan.layout, recipe.data
    print(
        f"fastwan plan: {args.recipe} on {args.nodes} node(s) x {args.gpus_per_node} GPU(s) "
        f"of {args.gpu_memory_gb:g} GB"
    )
    note = ""
    if lay.world_size != recipe.parallel.world_size:
        note = f" (the recipe's world_size is {recipe.parallel.world_size}; replicate rescaled)"
    print(
        f"layout: replicate {lay.replicate} x shard {lay.shard} x sequence_parallel "
        f"{lay.sequence_parallel} = {lay.world_size} GPUs{note}; FSDP shards over "
        f"shard x sequence_parallel = {lay.fsdp_size}"
    )
    T, H, W = plan.latent_grid
    print(
        f"clip {d.num_frames}x{d.height}x{d.width} -> latent {T}x{H}x{W} -> {plan.tokens:,} "
        f"tokens, {plan.tokens_per_gpu:,} per GPU; micro-batch {plan.micro_batch_size}; "
        f"compute {recipe.train.mixed_precision}"
    )
    print(plan.table())
    mode = plan.checkpointing
    if plan.fits:
        print(f"verdict: fits with activation_checkpointing={mode}")
        return 0
    shard = smallest_fitting_shard(recipe, **kwargs)
    hint = "; no shard size fits this GPU count"
    if shard is not None:
        replicate = lay.world_size // (shard * lay.sequence_parallel)
        hint = f"; --parallel.shard={shard} (replicate {replicate}) fits"
    print(f"verdict: does NOT fit with activation_checkpointing={mode}{hint}")
    return 0 if args.no_fail else 1
