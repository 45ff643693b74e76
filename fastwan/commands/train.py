"""``fastwan distill`` / ``fastwan finetune``: train from a YAML recipe; ``fastwan export``:
a training checkpoint's student (or its EMA) as a Diffusers pipeline folder."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from fastwan.choices import METHOD_OF_COMMAND

# Namespace attributes of the recipe options: "recipe:optim.generator.lr" etc.
_RECIPE_DEST = "recipe:"


def register(subparsers) -> None:
    for command, method in METHOD_OF_COMMAND.items():
        what = (
            "sparse distillation (DMD2 + VSA) of a Wan teacher into a few-step student"
            if method == "dmd"
            else "flow-matching fine-tuning of a Wan transformer (dense or VSA)"
        )
        p = subparsers.add_parser(
            command,
            help=what,
            description=(
                f"{what[0].upper()}{what[1:]} (train.method: {method}). Every recipe field "
                "below can be overridden with --section.key=VALUE after the recipe, VALUE "
                "written as in the YAML (e.g. --train.max_steps=10, --vsa.tile_size=[4,4,4], "
                "--train.ema_decay=null). `fastwan "
                f"{command} RECIPE --help` also shows the recipe's values."
            ),
            usage="%(prog)s [-h] RECIPE [options] [--section.key=VALUE ...]",
            add_help=False,
            allow_abbrev=False,
        )
        p.add_argument("-h", "--help", action=_RecipeHelp, help="show this help and exit")
        p.add_argument("recipe", type=Path, metavar="RECIPE", help="YAML recipe (see recipes/)")
        _add_train_options(p, method)
        add_recipe_arguments(p)
        p.set_defaults(func=run_training, method=method, unknown_args=refuse_unknown_args)

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
    e.add_argument(
        "--merge-lora",
        action="store_true",
        help="a LoRA run (lora.rank > 0): fold the adapter into its base and write a Diffusers "
        "folder (default for a LoRA run: the adapter as a diffusers-format Wan LoRA folder, "
        "pytorch_lora_weights.safetensors + vsa_gates.safetensors)",
    )
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


def _help_text(option, recipe_value: str | None = None) -> str:
    """An option's help: its docstring, the recipe's value (when a recipe is given) and the
    default; ``%`` escaped for argparse."""
    default = "required" if option.default is None else f"default: {_short(option.default)}"
    if recipe_value is not None:
        default = f"recipe: {_short(recipe_value)}; {default}"
    return f"{option.help} ({default})".replace("%", "%%")


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--section.key VALUE`` option per recipe field, grouped by section;
    :func:`recipe_overrides` gives the ones set, as ``load_recipe`` overrides. Their help
    (the fields' docstrings, :func:`fastwan.config.recipe_options`) is filled in when
    ``--help`` asks for it (pydantic reads the docstrings in about 0.4 s)."""
    from fastwan.config import recipe_fields

    groups: dict = {}
    actions: dict = {}
    for name in recipe_fields():
        section = name.rsplit(".", 1)[0]
        if section not in groups:
            groups[section] = p.add_argument_group(f"recipe {section}")
        actions[name] = groups[section].add_argument(
            f"--{name}", dest=_RECIPE_DEST + name, metavar="VALUE", default=argparse.SUPPRESS
        )
    p.recipe_groups, p.recipe_actions = groups, actions


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe options given on the command line as ``section.key=VALUE`` overrides."""
    return [
        f"{key[len(_RECIPE_DEST) :]}={value}"
        for key, value in vars(args).items()
        if key.startswith(_RECIPE_DEST)
    ]


def refuse_unknown_args(extra: list[str]) -> None:
    """Arguments no option took: an unknown recipe key names the valid ones (did you mean),
    anything else says what overrides look like."""
    from fastwan.config import check_override_key

    for item in extra:
        if item.startswith("--"):
            check_override_key(item)  # raises naming the key and the valid ones
    raise ValueError(
        f"unrecognised arguments {extra}; recipe overrides look like --section.key=VALUE "
        "(e.g. --train.max_steps=10)"
    )


class _RecipeHelp(argparse.Action):
    """``-h`` / ``--help`` with every recipe field's help; after a recipe path it also
    shows the values that recipe sets."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):  # fmt: skip
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        _fill_recipe_help(parser, getattr(namespace, "recipe", None))
        parser.print_help()
        parser.exit()


def _fill_recipe_help(parser: argparse.ArgumentParser, recipe: Path | None) -> None:
    from fastwan.config import load_recipe_dict, recipe_options

    values: dict = {}
    if recipe is not None:
        try:
            values = _flatten(load_recipe_dict(recipe))
            parser.description += f" 'recipe:' below: the values of {recipe}."
        except ValueError as err:
            parser.description += f" ({err})"
    groups, actions = getattr(parser, "recipe_groups", {}), getattr(parser, "recipe_actions", {})
    for option in recipe_options():
        action = actions.get(option.name)
        if action is None:
            continue
        given = values.get(option.name, _MISSING)
        action.metavar = option.metavar
        action.help = _help_text(option, None if given is _MISSING else _yaml_text(given))
        if option.section in groups:
            groups[option.section].description = option.section_help.replace("%", "%%")


_MISSING = object()


def _flatten(data, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml_text(value) -> str:
    import yaml

    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6)
        .strip()
        .removesuffix("\n...")
        .strip()
    )


def parse_trailing_overrides(
    options: argparse.ArgumentParser, args: argparse.Namespace, example: str
) -> list[str]:
    """Options given after the recipe land in ``args.overrides`` with the recipe
    overrides: parse those ``options`` knows into ``args`` and return the rest, which must
    be ``--section.key=VALUE`` (``example`` shows one in the error). Used by ``fastwan
    plan``; ``distill`` / ``finetune`` take the recipe fields as options
    (:func:`add_recipe_arguments`)."""
    _, extra = options.parse_known_args(list(args.overrides), namespace=args)
    bad = [x for x in extra if "=" not in x or not x.startswith("--")]
    if bad:
        raise ValueError(
            f"unrecognised arguments {bad}; recipe overrides look like --section.key=VALUE "
            f"(e.g. {example})"
        )
    return extra


def run_training(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from fastwan.config import dump_recipe, load_recipe
    from fastwan.data.parquet_io import atomic_write_json
    from fastwan.train.build import RECIPE_FILE, build_trainer
    from fastwan.train.checkpoint_io import checkpoint_dir, is_complete
    from fastwan.train.trainer import SkippedRowsError

    recipe = load_recipe(args.recipe, recipe_overrides(args))
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

    from fastwan.config import load_recipe
    from fastwan.models.export import export_pipeline
    from fastwan.models.loading import load_transformer, resolve_model_path
    from fastwan.train.build import RECIPE_FILE
    from fastwan.train.checkpoint import check_checkpoint, load_network_weights

    ckpt = args.checkpoint
    check_checkpoint(ckpt)  # a training checkpoint of this format version (any process count)
    # the recipe that trained up to this checkpoint (its own), else the run's
    recipe_file = ckpt / RECIPE_FILE
    if not recipe_file.is_file():
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
    if recipe is not None and recipe.lora.enabled:  # the adapter (or the merged model)
        from fastwan.train.lora_export import export_lora

        out = export_lora(
            ckpt,
            recipe,
            args.out,
            model=args.model,
            ema=args.ema,
            merge=args.merge_lora,
            overwrite=args.overwrite,
            sampling=export_sampling(recipe),
        )
        what = "merged model" if args.merge_lora else "LoRA adapter"
        print(f"exported the {what} ({'EMA' if args.ema else 'generator'}) of {ckpt} to {out}")
        return 0
    if args.merge_lora:
        raise ValueError(
            f"--merge-lora: {str(ckpt)!r} was trained without LoRA (lora.rank 0 in its "
            "recipe); export it without --merge-lora"
        )
    transformer = load_transformer(resolve_model_path(student), dtype=torch.float32)
    # consolidate the generator's shards (any number of saving ranks) into one model
    load_network_weights(ckpt, "generator", transformer)
    if args.ema:
        load_network_weights(ckpt, "generator", transformer, ema=True)
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
