"""``fastwan distill`` / ``fastwan finetune``: train from a YAML recipe; ``fastwan export``:
a training checkpoint's student (or its EMA) as a Diffusers pipeline folder."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

_METHODS = {"distill": "dmd", "finetune": "flow"}


def register(subparsers) -> None:
    for command, method in _METHODS.items():
        what = (
            "sparse distillation (DMD2 + VSA) of a Wan teacher into a few-step student"
            if method == "dmd"
            else "flow-matching fine-tuning of a Wan transformer (dense or VSA)"
        )
        p = subparsers.add_parser(
            command,
            help=what,
            description=(
                f"{what[0].upper()}{what[1:]} (train.method: {method}). Any recipe field can "
                "be overridden with --section.key=VALUE, e.g. --train.max_steps=10."
            ),
        )
        p.add_argument("recipe", type=Path, help="YAML recipe (see recipes/)")
        _add_train_options(p, method)
        p.add_argument(
            "overrides",
            nargs=argparse.REMAINDER,
            help="recipe overrides --section.key=VALUE (e.g. --train.max_steps=10)",
        )
        p.set_defaults(func=run_training, method=method)

    e = subparsers.add_parser(
        "export",
        help="write a training checkpoint's student as a Diffusers pipeline folder",
        description=(
            "Export the generator of a checkpoint-<step> folder (or its EMA with --ema) as a "
            "Diffusers folder that `fastwan generate` / VideoGenerator load; the other "
            "components are copied from the recipe's teacher folder."
        ),
    )
    e.add_argument("checkpoint", type=Path, help="a checkpoint-<step> folder")
    e.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    e.add_argument("--ema", action="store_true", help="export the EMA weights")
    e.add_argument(
        "--model",
        default=None,
        help="pipeline folder the checkpoint was trained from (default: the run's recipe.yaml)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.set_defaults(func=run_export)


def _add_train_options(p: argparse.ArgumentParser, method: str) -> None:
    p.add_argument(
        "--resume",
        default=None,
        help="'latest' (the newest checkpoint under train.output_dir, if any) or a "
        "checkpoint-<step> folder (a path, or a name under train.output_dir); checked before "
        "any model loads. The recipe may differ from the checkpoint's only in fields safe to "
        "change (train.max_steps, intervals, validation, trackers, the mesh, optim lr / "
        "weight_decay / grad_clip, ...): those are applied and recorded in "
        "<output_dir>/recipe_changes.jsonl, any other change is refused",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    if method == "dmd":
        p.add_argument(
            "--negative-prompt",
            default=None,
            help="the teacher's CFG negative prompt (same as --dmd.negative_prompt=TEXT)",
        )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_trailing_overrides(
    options: argparse.ArgumentParser, args: argparse.Namespace, example: str
) -> list[str]:
    """Options given after the recipe land in ``args.overrides`` with the recipe
    overrides: parse those ``options`` knows into ``args`` and return the rest, which must
    be ``--section.key=VALUE`` (``example`` shows one in the error)."""
    _, extra = options.parse_known_args(list(args.overrides), namespace=args)
    bad = [x for x in extra if "=" not in x or not x.startswith("--")]
    if bad:
        raise ValueError(
            f"unrecognised arguments {bad}; recipe overrides look like --section.key=VALUE "
            f"(e.g. {example})"
        )
    return extra


def _split_overrides(args: argparse.Namespace) -> list[str]:
    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_train_options(options, args.method)
    return parse_trailing_overrides(options, args, "--train.max_steps=10")


def run_training(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from fastwan.config import dump_recipe, load_recipe
    from fastwan.data.parquet_io import atomic_write_json
    from fastwan.train.build import RECIPE_FILE, build_trainer
    from fastwan.train.checkpoint_io import checkpoint_dir, is_complete
    from fastwan.train.trainer import SkippedRowsError

    overrides = _split_overrides(args)
    recipe = load_recipe(args.recipe, overrides)
    if recipe.train.method != args.method:
        raise ValueError(
            f"train.method is {recipe.train.method!r} but `fastwan {args.command}` runs "
            f"{args.method!r}; set --train.method={args.method} or use `fastwan "
            f"{'distill' if recipe.train.method == 'dmd' else 'finetune'}`"
        )
    if getattr(args, "negative_prompt", None) is not None:
        recipe.dmd.negative_prompt = args.negative_prompt  # kept in the run's recipe.yaml
    bar = None

    def log(line: str) -> None:
        (bar.write if bar is not None else print)(line, file=sys.stderr)

    # The output dir, the checkpoint to resume and the recipe's changes since it are checked
    # before any model loads.
    setup = build_trainer(
        recipe,
        device=args.device,
        log_fn=log,
        progress=not args.no_progress,
        resume=args.resume,
    )
    trainer = setup.trainer
    # Under torchrun every rank runs this; rank 0 speaks and writes the run's files.
    main = trainer.parallel is None or trainer.parallel.is_main
    say = print if main else (lambda *_a, **_k: None)
    out_dir = trainer.output_dir
    resumed = None
    if args.resume is not None:
        if setup.resume_from is None:
            say(f"no checkpoint under {out_dir}; starting from step 0")
        else:
            resumed = trainer.resume(setup.resume_from)
            say(f"resumed from {resumed} at step {trainer.step}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # recipe.yaml: the recipe the run started with. A resume keeps it (each checkpoint holds
    # its own recipe.yaml; safe changes are appended to recipe_changes.jsonl).
    if main and (resumed is None or not (out_dir / RECIPE_FILE).is_file()):
        dump_recipe(recipe, out_dir / RECIPE_FILE)

    def write_summary(**extra) -> dict:
        summary = {
            "command": args.command,
            "method": recipe.train.method,
            "step": trainer.step,
            "max_steps": recipe.train.max_steps,
            "data": trainer.data_summary(),
            **extra,
        }
        if main:
            atomic_write_json(out_dir / "summary.json", json.loads(json.dumps(summary)))
        return summary

    say(
        f"{args.command}: {recipe.train.method} on {setup.device}, teacher {setup.model_path}, "
        f"steps {trainer.step} -> {recipe.train.max_steps}, output {out_dir}"
    )

    start_step, start = trainer.step, time.perf_counter()
    bar = tqdm(
        total=recipe.train.max_steps,
        initial=trainer.step,
        desc=args.command,
        unit="step",
        disable=args.no_progress or not main,
        file=sys.stderr,
    )
    last: dict = {}
    try:
        while trainer.step < recipe.train.max_steps:
            last = trainer.train(1)[0]
            bar.set_postfix(
                {k: f"{v:.3g}" for k, v in last.items() if k.endswith("_loss")}, refresh=False
            )
            bar.update(1)
    except SkippedRowsError as err:  # the data is more broken than the recipe allows
        write_summary(complete=False, stopped=str(err))
        raise
    finally:
        bar.close()
        bar = None
    elapsed = time.perf_counter() - start
    ran = trainer.step - start_step
    interval = recipe.train.checkpoint_interval
    saved = checkpoint_dir(out_dir, trainer.step)
    if ran > 0 and interval and trainer.step % interval == 0 and is_complete(saved):
        checkpoint = saved  # the periodic save of the last step
    else:
        checkpoint = trainer.save_checkpoint()
    say(f"done: {ran} steps in {elapsed:.1f}s ({elapsed / max(ran, 1):.2f} s/step)")
    for key in sorted(k for k in last if k.endswith("_loss")):
        values = [r[key] for r in trainer.history if key in r]
        finite = all(math.isfinite(v) for v in values)
        say(f"  {key}: last {last[key]:.4g}, mean {sum(values) / len(values):.4g}"
            f"{'' if finite else ' (NON-FINITE values seen)'}")  # fmt: skip
    data = write_summary(complete=True, checkpoint=str(checkpoint))["data"]
    if data["rows_read"]:
        reasons = ", ".join(f"{r} {n}" for r, n in data["skipped_by_reason"].items() if n)
        say(
            f"  data: {data['rows_read']} rows read, {data['rows_skipped']} skipped "
            f"({data['skip_fraction']:.1%}{': ' + reasons if reasons else ''}; limit "
            f"data.max_skip_fraction {data['max_skip_fraction']:.1%})"
            + (f"; {len(data['skipped_files'])} unreadable files" if data["skipped_files"] else "")
        )
    say(f"checkpoint: {checkpoint}")
    say(f"summary: {out_dir / 'summary.json'}")
    if trainer.parallel is not None and trainer.parallel.distributed:
        from fastwan.distributed.mesh import destroy_parallel

        destroy_parallel()
    return 0


def run_export(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file

    from fastwan.config import load_recipe
    from fastwan.distributed.checkpoint import is_sharded_checkpoint, load_network_weights
    from fastwan.models.export import export_pipeline
    from fastwan.models.loading import load_transformer, resolve_model_path
    from fastwan.train.build import RECIPE_FILE

    ckpt = args.checkpoint
    weights = ckpt / "generator.safetensors"
    sharded = is_sharded_checkpoint(ckpt)  # written by a multi-process run (DCP shards)
    if not weights.is_file() and not sharded:
        raise ValueError(
            f"{str(ckpt)!r} has no generator.safetensors (nor sharded dcp/ files); pass a "
            "checkpoint-<step> folder written by `fastwan distill` / `fastwan finetune`"
        )
    recipe_file = ckpt.parent / RECIPE_FILE
    recipe = load_recipe(recipe_file) if recipe_file.is_file() else None
    if args.model is not None:
        teacher, student = args.model, args.model
    elif recipe is not None:
        teacher, student = recipe.model.teacher, recipe.model.student_path
    else:
        raise ValueError(
            f"{str(recipe_file)!r} does not exist, so the source model is unknown; pass "
            "--model DIR (the pipeline folder the run trained from)"
        )
    transformer = load_transformer(resolve_model_path(student), dtype=torch.float32)
    if sharded:  # consolidate the shards (any number of saving ranks) into one model
        load_network_weights(ckpt, "generator", transformer)
        if args.ema:
            load_network_weights(ckpt, "generator", transformer, ema=True)
    state = {} if sharded else load_file(str(weights), device="cpu")  # sharded: loaded above
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if (missing or unexpected) and not sharded:
        raise ValueError(
            f"{weights} does not match the transformer of {student!r}: missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}; pass --model with "
            "the folder the run trained from"
        )
    if args.ema and not sharded:
        trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        ema = trainer_state.get("ema")
        if ema is None:
            raise ValueError(
                f"{str(ckpt)!r} has no EMA (train.ema_decay was null); export without --ema"
            )
        params = dict(transformer.named_parameters())
        with torch.no_grad():
            for name, value in ema["shadow"].items():
                if name not in params:
                    raise ValueError(f"EMA weight {name!r} is not a parameter of the model")
                params[name].copy_(value.to(params[name].dtype))
    out = export_pipeline(
        resolve_model_path(teacher),
        transformer,
        args.out,
        overwrite=args.overwrite,
        sampling=export_sampling(recipe) if recipe is not None else None,
    )
    which = "EMA" if args.ema else "generator"
    print(f"exported the {which} weights of {ckpt} to {out}")
    return 0


def export_sampling(recipe) -> dict:
    """How a trained student samples, for the export's ``fastwan.json``: the method's
    timesteps (``dmd``: few-step, no CFG), its attention and the clip size it trained at."""
    sampling: dict = {
        "attention": "vsa" if recipe.vsa.enabled else "dense",
        "height": recipe.data.height,
        "width": recipe.data.width,
        "num_frames": recipe.data.num_frames,
        "text_length": recipe.data.text_length,
    }
    if recipe.vsa.enabled:
        sampling["sparsity"] = recipe.vsa.sparsity
        sampling["tile_size"] = list(recipe.vsa.tile_size)
    if recipe.train.method == "dmd":
        sampling["timesteps"] = list(recipe.dmd.denoising_timesteps)
        sampling["guidance_scale"] = 1.0
    return sampling
