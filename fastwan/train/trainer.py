"""The training loop shared by every method (:class:`fastwan.methods.base.Method`).

One *step* (``train.max_steps`` of them) consumes ``train.gradient_accumulation_steps``
micro-batches from the data and updates, in order, the roles the method's schedule names
for it (``method.updates(step)``, ``step`` = steps completed before this one), each on
those same micro-batches: ``dmd`` the generator on every
``dmd.generator_update_interval``-th step (the first one included) and then the critic;
``flow`` its one network. The trainer has no method-specific code.

Per network: AdamW with its ``optim.<role>`` settings, a ``LambdaLR`` schedule from
:mod:`fastwan.methods.schedules` that steps with that network's own updates, gradient-norm
clipping (``grad_clip``; the norm is logged either way).

All randomness of the methods comes from one ``torch.Generator``, ``Trainer.rng``, seeded
with ``train.seed``. A checkpoint (:meth:`Trainer.save_checkpoint`: DCP, atomic, the same path
for one and many processes, :mod:`fastwan.train.checkpoint`) holds every trainable
network's weights, optimizers, schedulers, the generator's EMA (``train.ema_decay``), the
step, the log history, the data position (when the data has ``state_dict``) and every RNG
state including ``rng``'s, so that ``2k`` steps equal ``k`` steps + resume + ``k``
steps exactly; it resumes on any mesh.

Hooks: a ``validator`` (:class:`fastwan.train.validation.Validator`) runs every
``train.validation_interval`` steps and at the last step; a ``tracker``
(:mod:`fastwan.train.tracking`) receives every step's metrics (losses, grad norms, learning
rates, timesteps, sparsity, step time, samples/s) and the validation grid. Neither touches
the training RNG or weights, so they do not change the losses. At the last step the loss
curves are plotted to ``<output_dir>/loss_curves.png``.

Skipped rows (``data.on_error: skip``): the rows each batch reports in ``batch["skipped"]``
(:func:`fastwan.data.dataset.collate_samples`) are counted per reason (``decode_error``,
``non_finite``, ``shape_mismatch``, ``too_short``) with the rows read; the counts go to
the console line, the tracker (``data/skipped``, ``data/skipped_<reason>``,
``data/skip_fraction``, ``data/rows_read``), the log history (so they survive a resume)
and :meth:`Trainer.data_summary`. When more than ``data.max_skip_fraction`` of the rows
read were skipped the run stops with :class:`SkippedRowsError` naming the files and rows:
checked every step once enough rows were read to tell (``20 / max_skip_fraction``), and
at the last step whatever the count.

Resume with a changed recipe: every checkpoint holds the recipe it was trained with
(``recipe.yaml``). :meth:`Trainer.resume` compares it with this run's field by field
(:func:`fastwan.config.resume_changes`): a change to a field that is not safe to
change refuses the resume naming each field, old -> new, and the fix; safe changes are
applied -- a new ``optim.<role>.lr`` / ``weight_decay`` (or ``train.max_steps``, which
re-spreads a cosine schedule) is written into the restored optimizer and LR schedule --,
logged, and appended to ``<output_dir>/recipe_changes.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fastwan.config import (
    Recipe,
    dump_recipe,
    load_recipe_dict,
    resume_changes,
)
from fastwan.distributed.mesh import ParallelState, data_parallel_seed
from fastwan.distributed.parallelize import (
    all_finite,
    all_reduce_mean,
    clip_grad_norm,
    set_gradient_sync,
)
from fastwan.methods.base import (
    Method,
    check_method,
    prepare_network,
    trained_parameters,
    update_counts,
)
from fastwan.methods.schedules import make_lr_scheduler
from fastwan.train.checkpoint import (
    PlainState,
    TrainingState,
    check_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from fastwan.train.checkpoint_io import (
    checkpoint_dir,
    ensure_valid_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
)
from fastwan.train.ema import EMA

__all__ = [
    "LOSS_PLOT_FILE",
    "RECIPE_CHANGES_FILE",
    "RECIPE_FILE",
    "Method",
    "SkippedRowsError",
    "Tracker",
    "Trainer",
    "Validator",
    "check_resume",
    "resolve_resume",
    "saved_recipe",
]

logger = logging.getLogger("fastwan.train")

_GENERATOR_NAME = "train"
RECIPE_FILE = "recipe.yaml"  # a run's starting recipe; also every checkpoint's own
RECIPE_CHANGES_FILE = "recipe_changes.jsonl"  # one JSON record per resume that changed it
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Skipped rows named in the console (then only counted) and in a SkippedRowsError.
_NAMED_SKIPS_LOGGED = 10
_NAMED_FILES = 5
_NAMED_ROWS_PER_FILE = 10
# The skip fraction is enforced once this many skipped rows are expected at the limit
# (rows read >= _SKIP_CHECK_EXPECTED / max_skip_fraction), so that a few unlucky early
# batches do not stop a run whose data is within the limit; and at the last step.
_SKIP_CHECK_EXPECTED = 20


class SkippedRowsError(ValueError):
    """More than ``data.max_skip_fraction`` of the rows read were skipped; the message
    names the files, the rows, the reasons and the fix."""


def _checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def resolve_resume(resume: str | Path | None, output_dir: str | Path) -> Path | None:
    """The checkpoint that ``resume`` names, checked before anything loads: ``None`` ->
    None; ``"latest"`` -> the newest complete checkpoint under ``output_dir`` (None when
    there is none); a path (as given, else relative to ``output_dir``, e.g.
    ``checkpoint-500``) -> it, when it is a complete trainer checkpoint of this fastwan's
    format version (:func:`fastwan.train.checkpoint.check_checkpoint`) whose files match
    their checksums. Otherwise a ValueError naming the path, the checkpoints there are (or
    the version found) and the fix."""
    if resume is None:
        return None
    output_dir = Path(output_dir)
    if str(resume) == "latest":
        found = latest_checkpoint(output_dir)
        if found is not None:
            check_checkpoint(found)  # an older format is named, not skipped
        return found
    given = Path(resume)
    candidates = [given] if given.is_absolute() else [given, output_dir / given]
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        found = [p.name for _step, p in list_checkpoints(output_dir)]
        have = (
            f"the complete checkpoints under {str(output_dir)!r} are {', '.join(found)}"
            if found
            else f"there is no complete checkpoint under {str(output_dir)!r}"
        )
        looked = " and ".join(repr(str(c)) for c in candidates)
        raise ValueError(
            f"resume checkpoint {str(resume)!r} does not exist (looked at {looked}); {have}. "
            "Pass one of them (--resume checkpoint-<step> or a path), --resume latest, or "
            "no --resume to start from step 0"
        )
    check_checkpoint(path)  # a trainer checkpoint, complete, of this format version
    return ensure_valid_checkpoint(path)  # a damaged file is named before anything loads


def saved_recipe(checkpoint: str | Path) -> tuple[dict[str, Any] | None, str]:
    """The recipe ``checkpoint`` was trained with, as nested dicts, and where it came
    from: the checkpoint's own ``recipe.yaml``; for a checkpoint without one (e.g. removed
    by hand), the run's ``recipe.yaml`` with the changes of ``recipe_changes.jsonl`` made
    before the checkpoint's step replayed on it; ``(None, reason)`` when neither exists."""
    checkpoint = Path(checkpoint)
    own = checkpoint / RECIPE_FILE
    if own.is_file():
        return load_recipe_dict(own), str(own)
    run_file = checkpoint.parent / RECIPE_FILE
    if not run_file.is_file():
        return None, f"neither {str(own)!r} nor {str(run_file)!r} exists"
    data = load_recipe_dict(run_file)
    step = _checkpoint_step(checkpoint)
    history = checkpoint.parent / RECIPE_CHANGES_FILE
    if history.is_file():
        for line in history.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if step is not None and int(record.get("step", 0)) >= step:
                continue
            for name, change in record.get("changes", {}).items():
                node = data
                *parents, leaf = name.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = change["new"]
    return data, f"{run_file} (+ {RECIPE_CHANGES_FILE})"


def check_resume(recipe: Recipe, checkpoint: str | Path) -> dict[str, tuple[Any, Any]]:
    """The safe changes from ``checkpoint``'s saved recipe to ``recipe`` (see
    :func:`fastwan.config.resume_changes`, which refuses the unsafe ones); ``{}``
    with a warning when no saved recipe can be found."""
    saved, source = saved_recipe(checkpoint)
    if saved is None:
        warnings.warn(
            f"cannot compare the recipe with the one {str(checkpoint)!r} trained with "
            f"({source}): a changed field would be taken without a check",
            stacklevel=2,
        )
        return {}
    return resume_changes(saved, recipe, checkpoint)


class Validator(Protocol):
    """Called with the trainer after a step; returns what it made (``images``: tag ->
    ``[H, W, 3]`` uint8 arrays are logged to the tracker), e.g.
    :class:`fastwan.train.validation.Validator`."""

    def __call__(self, trainer: Trainer) -> Any: ...


class Tracker(Protocol):
    """A metrics sink, e.g. :class:`fastwan.train.tracking.Trackers`."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_images(self, images: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


LOSS_PLOT_FILE = "loss_curves.png"


class Trainer:
    """Runs ``recipe.train.max_steps`` steps of ``method`` on ``data``.

    Args:
        method: a :class:`~fastwan.methods.base.Method`, e.g. a
            :class:`~fastwan.methods.dmd.DMDMethod` or
            :class:`~fastwan.methods.flow.FlowMethod`; its ``name`` must equal
            ``recipe.train.method``, each of its roles has an ``optim.<role>``.
        recipe: the training configuration (``train``, ``optim``, ``dmd`` are read).
        data: an iterable of micro-batches (dicts from
            :func:`fastwan.data.dataset.collate_samples`), re-iterated when exhausted,
            e.g. :func:`fastwan.data.build_train_loader`'s; when it has ``state_dict`` /
            ``load_state_dict`` its position is checkpointed.
        output_dir: where checkpoints go (default ``recipe.train.output_dir``).
        log_fn: receives the console line every ``train.log_interval`` steps
            (default: ``logging.getLogger("fastwan.train").info``).
        validator: called as ``validator(trainer)`` every ``train.validation_interval``
            steps (0: never periodically) and after the last step.
        tracker: receives every step's metrics and the validator's images; closed after
            the last step.
        parallel: this process's place in the mesh
            (:func:`fastwan.distributed.mesh.init_parallel`) when the networks were wrapped
            by :func:`fastwan.distributed.parallelize.parallelize_method` (``None``: one
            process). With more than one process: gradients are reduced only on the last
            micro-batch, logged losses are means over ranks, the training ``rng`` is
            seeded per data-parallel rank, only rank 0 logs, and every rank writes its
            shards of the checkpoints (:mod:`fastwan.train.checkpoint`).
    """

    def __init__(
        self,
        method: Method,
        recipe: Recipe,
        data: Iterable[Mapping[str, Any]],
        *,
        output_dir: str | Path | None = None,
        log_fn: Callable[[str], None] | None = None,
        validator: Validator | None = None,
        tracker: Tracker | None = None,
        parallel: ParallelState | None = None,
    ) -> None:
        if not isinstance(recipe, Recipe):
            raise ValueError(f"recipe must be a Recipe, got {type(recipe).__name__}")
        check_method(method)
        name = method.name
        if name != recipe.train.method:
            raise ValueError(
                f"train.method is {recipe.train.method!r} but the method is {name!r}; set "
                f"train.method: {name} or build the {recipe.train.method!r} method"
            )
        self.method = method
        self.recipe = recipe
        self.data = data
        self.output_dir = Path(output_dir if output_dir is not None else recipe.train.output_dir)
        self.log_fn = log_fn if log_fn is not None else logger.info
        self.parallel = parallel
        self._distributed = parallel is not None and parallel.distributed
        if self._distributed and not parallel.is_main:
            self.log_fn = lambda _line: None  # rank 0 speaks for the run
        self.validator = validator
        self.tracker = tracker
        self.device = method.device
        train = recipe.train
        self.accumulation = train.gradient_accumulation_steps

        networks = dict(method.networks())
        roles = tuple(method.roles)
        if set(networks) != set(roles) or len(set(roles)) != len(roles):
            raise ValueError(
                f"{type(method).__name__}.networks() has the roles {sorted(networks)} but its "
                f"roles are {roles}; they must be the same (each once)"
            )
        # Each role's LR schedule spans that role's own updates over the run.
        counts = update_counts(method, train.max_steps)
        self.networks: dict[str, nn.Module] = {role: networks[role] for role in roles}
        self._trained: dict[str, dict[str, nn.Parameter]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        for role in self.networks:
            cfg = getattr(recipe.optim, role, None)
            if cfg is None:
                raise ValueError(
                    f"the method's role {role!r} has no optimizer settings: the recipe's optim "
                    f"has {', '.join(vars(recipe.optim))}"
                )
            # what the role trains: the whole network, or part of one (a LoRA adapter)
            self._trained[role] = trained_parameters(method, role)
            opt = torch.optim.AdamW(
                list(self._trained[role].values()),
                lr=cfg.lr,
                betas=cfg.betas,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
            )
            self.optimizers[role] = opt
            self.schedulers[role] = make_lr_scheduler(opt, cfg, max(1, counts[role]))

        # EMA of the generator's weights, updated after each generator update; before
        # train.ema_start_step it restarts at the live weights (tracks them exactly).
        if train.ema_decay is not None and "generator" not in self.networks:
            raise ValueError(
                f"train.ema_decay averages the 'generator' network, but the method's roles "
                f"are {roles}; set train.ema_decay: null"
            )
        self.ema = (
            EMA(self.networks["generator"], train.ema_decay, names=self._trained["generator"])
            if train.ema_decay is not None
            else None
        )
        # SP ranks of a group share their data-parallel rank's seed (same timesteps, noise).
        seed = train.seed if parallel is None else data_parallel_seed(train.seed, parallel.dp_rank)
        self.rng = torch.Generator(device=self.device).manual_seed(seed)  # every loss draws
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._data_iter: Iterator[Mapping[str, Any]] | None = None
        # Rows read and skipped (from batch["skipped"]); rebuilt from the history on resume.
        self._rows_read = 0
        self._skipped: Counter[str] = Counter()
        self._skipped_rows: list[dict[str, Any]] = []  # {"file", "row", "reason"}
        self._skip_messages: dict[str, str] = {}  # reason -> the first message seen
        self._counts_rows = False  # whether the data reports skipped rows

    # ----------------------------------------------------------------- data
    def _next_batch(self) -> Mapping[str, Any]:
        if self._data_iter is None:
            self._data_iter = iter(self.data)
        try:
            return next(self._data_iter)
        except StopIteration:
            self._data_iter = iter(self.data)
            try:
                return next(self._data_iter)
            except StopIteration:
                raise ValueError("the training data yielded no batches") from None

    def _autocast(self):
        if self.recipe.train.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ----------------------------------------------------------------- one update
    def _update(self, role: str, batches: list[Mapping[str, Any]]) -> dict[str, float]:
        """Accumulate ``role``'s loss over ``batches``, clip, step ``role``'s optimizer."""
        net, opt, sched = self.networks[role], self.optimizers[role], self.schedulers[role]
        cfg = getattr(self.recipe.optim, role)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        extras: dict[str, float] = {}
        for i, batch in enumerate(batches):
            if self._distributed:  # reduce-scatter only after the last micro-batch
                set_gradient_sync(net, i == len(batches) - 1)
            with self._autocast():
                loss, info = self.method.loss(role, batch, self.rng)
            finite = all_finite(loss) if self._distributed else bool(torch.isfinite(loss))
            if not finite:
                raise FloatingPointError(
                    f"step {self.step + 1}: the {role} loss is {float(loss)}; lower "
                    f"optim.{role}.lr or check the data"
                )
            (loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
            for key, value in info.items():
                extras[key] = extras.get(key, 0.0) + float(value) / len(batches)
        params = list(self._trained[role].values())
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = clip_grad_norm(params, max_norm)  # global over shards and ranks
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if role == "generator" and self.ema is not None:
            if self.step < self.recipe.train.ema_start_step:
                self.ema.reset(net)
            else:
                self.ema.update(net)
        if self._distributed:  # log the global mean (SP ranks hold equal values)
            means = all_reduce_mean({"loss": total, **extras}, self.device)
            total = means.pop("loss")
            extras = means
        out = {f"{role}_loss": total, f"{role}_grad_norm": grad_norm, f"{role}_lr": lr}
        out.update({f"{role}_{k}": v for k, v in extras.items()})
        return out

    def train_step(self) -> dict[str, Any]:
        """One training step; returns (and appends to :attr:`history`) its log record."""
        start = time.perf_counter()
        self.method.set_step(self.step)
        batches = [self._next_batch() for _ in range(self.accumulation)]
        record: dict[str, Any] = {"step": self.step + 1}
        self._count_rows(batches, record)
        updates = tuple(self.method.updates(self.step))  # the method's schedule, in order
        unknown = [role for role in updates if role not in self.networks]
        if unknown or len(set(updates)) != len(updates):
            raise ValueError(
                f"{type(self.method).__name__}.updates({self.step}) returned {updates}: each "
                f"of its roles {tuple(self.networks)} at most once"
            )
        for role in self.networks:
            record[f"{role}_updated"] = role in updates
        for role in updates:
            record.update(self._update(role, batches))
        record["sparsity"] = float(self.method.sparsity)
        self.step += 1
        record["step_time"] = time.perf_counter() - start
        self.history.append(record)
        if self.step % self.recipe.train.log_interval == 0 or self.step == 1:
            self.log_fn(self._console_line(record))
        if self.tracker is not None:
            self.tracker.log_metrics(self._metrics(record), self.step)
        return record

    # ----------------------------------------------------------------- skipped rows
    def _count_rows(self, batches: Sequence[Mapping[str, Any]], record: dict[str, Any]) -> None:
        """Count the rows these batches read and skipped (summed over data-parallel ranks),
        record them in ``record`` and stop when too many were skipped."""
        if not any("skipped" in b for b in batches):
            return
        self._counts_rows = True
        skipped = [dict(s) for b in batches for s in b.get("skipped", ())]
        # Rows read = rows the sampler asked for; a skipped one was replaced by the next good
        # row (which counts when it is asked for itself), so skipped / read estimates the
        # fraction of bad rows in the data.
        rows = sum(len(b["id"]) if "id" in b else len(b["index"]) for b in batches)
        if self._distributed:  # every rank must see the same totals (and stop together)
            rows, skipped = self._gather_rows(rows, skipped)
        for s in skipped:
            self._skip_messages.setdefault(s["reason"], s.get("message", ""))
        compact = [
            {"file": x["file"], "row": int(x["row"]), "reason": x["reason"]} for x in skipped
        ]
        record["data_rows"] = rows
        if compact:
            record["data_skipped"] = dict(Counter(x["reason"] for x in compact))
            record["data_skipped_rows"] = compact
        for s, entry in zip(skipped, compact):
            if len(self._skipped_rows) < _NAMED_SKIPS_LOGGED:
                self.log_fn(
                    f"step {record['step']}: skipped {s['file']} row {s['row']} "
                    f"({s['reason']}): {s.get('message', '')}"
                )
            self._skipped_rows.append(dict(entry))
        self._rows_read += rows
        self._skipped.update(s["reason"] for s in compact)
        self._check_skip_fraction(last=record["step"] >= self.recipe.train.max_steps)

    def _gather_rows(
        self, rows: int, skipped: list[dict[str, Any]]
    ) -> tuple[int, list[dict[str, Any]]]:
        """Global rows read and skipped rows (SP ranks of a group read the same rows)."""
        import torch.distributed as dist

        sp = self.parallel.sp_size
        means = all_reduce_mean({"rows": rows, "skipped": len(skipped)}, self.device)
        world = self.parallel.world_size
        total_rows = round(means["rows"] * world / sp)
        if round(means["skipped"] * world) == 0:
            return total_rows, []
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, skipped)
        keep = [g for rank, g in enumerate(gathered) if rank % sp == 0]  # one rank per group
        return total_rows, [s for group in keep for s in group]

    def _check_skip_fraction(self, last: bool) -> None:
        limit = self.recipe.data.max_skip_fraction
        count, rows = sum(self._skipped.values()), self._rows_read
        if not count or count <= limit * rows:
            return
        if not (limit == 0 or last or rows >= _SKIP_CHECK_EXPECTED / limit):
            return  # too few rows read to tell yet
        raise SkippedRowsError(self._skip_report(count, rows, limit))

    def _skip_report(self, count: int, rows: int, limit: float) -> str:
        by_file: dict[str, set[int]] = {}
        for s in self._skipped_rows:
            by_file.setdefault(s["file"], set()).add(s["row"])
        files = []
        for file, rows_of in list(by_file.items())[:_NAMED_FILES]:
            listed = sorted(rows_of)
            more = len(listed) - _NAMED_ROWS_PER_FILE
            text = ", ".join(map(str, listed[:_NAMED_ROWS_PER_FILE]))
            files.append(f"{file} (rows {text}{f' and {more} more' if more > 0 else ''})")
        if len(by_file) > _NAMED_FILES:
            files.append(f"and {len(by_file) - _NAMED_FILES} more files")
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self._skipped.items()))
        first = next(iter(self._skip_messages.values()), "")
        return (
            f"data.max_skip_fraction: {count} of the {rows} rows read by step "
            f"{self.step + 1} were skipped ({count / rows:.1%} > {limit:.1%}; {reasons}) in "
            f"{'; '.join(files)}.{f' First: {first}.' if first else ''} Repair or delete "
            "those rows or files (re-encode them with fastwan preprocess), or raise "
            "data.max_skip_fraction to train on the rest"
        )

    def _rebuild_row_counts(self) -> None:
        """The skip counters from the (resumed) history."""
        self._rows_read, self._skipped, self._skipped_rows = 0, Counter(), []
        for record in self.history:
            if "data_rows" not in record:
                continue
            self._counts_rows = True
            self._rows_read += int(record["data_rows"])
            for s in record.get("data_skipped_rows", ()):
                self._skipped[s["reason"]] += 1
                self._skipped_rows.append(dict(s))

    def data_summary(self) -> dict[str, Any]:
        """Rows read and skipped so far (the whole run, across resumes): per reason, per
        file, and the files the dataset could not open."""
        from fastwan.data.dataset import SKIP_REASONS

        dataset = getattr(self.data, "dataset", None)
        by_file: dict[str, list[int]] = {}
        for s in self._skipped_rows:
            by_file.setdefault(s["file"], []).append(s["row"])
        count = sum(self._skipped.values())
        return {
            "rows_read": self._rows_read,
            "rows_skipped": count,
            "skip_fraction": count / self._rows_read if self._rows_read else 0.0,
            "max_skip_fraction": self.recipe.data.max_skip_fraction,
            "skipped_by_reason": {r: self._skipped.get(r, 0) for r in SKIP_REASONS},
            "skipped_rows_by_file": {f: sorted(set(r)) for f, r in by_file.items()},
            "skipped_files": [
                {"file": f, "reason": why} for f, why in getattr(dataset, "skipped_files", [])
            ],
            "rows_of_another_size": dict(getattr(dataset, "shape_skips", {})),
        }

    def _samples_per_step(self) -> int:
        return self.recipe.train.micro_batch_size * self.accumulation  # this process's

    def _metrics(self, record: Mapping[str, Any]) -> dict[str, float]:
        """The record's numbers under ``train/`` plus throughput (not kept in the history:
        it differs between runs), and the run's skipped-row counts under ``data/``."""
        out = {
            f"train/{k}": float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        out["train/samples_per_s"] = self._samples_per_step() / max(record["step_time"], 1e-9)
        if self._counts_rows:
            from fastwan.data.dataset import SKIP_REASONS

            count = sum(self._skipped.values())
            out["data/rows_read"] = float(self._rows_read)
            out["data/skipped"] = float(count)
            out["data/skip_fraction"] = count / max(self._rows_read, 1)
            for reason in SKIP_REASONS:
                out[f"data/skipped_{reason}"] = float(self._skipped.get(reason, 0))
        return out

    def _console_line(self, record: Mapping[str, Any]) -> str:
        parts = [f"step {record['step']}/{self.recipe.train.max_steps}"]
        for key, value in record.items():
            if key.endswith(("_loss", "_grad_norm")):
                parts.append(f"{key} {value:.4g}")
            elif key.endswith("_lr"):
                parts.append(f"{key} {value:.3g}")
        parts.append(f"{record['step_time']:.2f}s")
        parts.append(f"{self._samples_per_step() / max(record['step_time'], 1e-9):.3g} samples/s")
        count = sum(self._skipped.values())
        if count:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self._skipped.items()))
            parts.append(
                f"skipped {count}/{self._rows_read} rows ({count / self._rows_read:.1%}: {reasons})"
            )
        return " | ".join(parts)

    def train(self, num_steps: int | None = None) -> list[dict[str, Any]]:
        """Run ``num_steps`` steps (default: up to ``train.max_steps``); saves a checkpoint
        every ``train.checkpoint_interval`` steps. Returns the records of these steps."""
        max_steps = self.recipe.train.max_steps
        if num_steps is None:
            num_steps = max_steps - self.step
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative int or None, got {num_steps!r}")
        if self.step + num_steps > max_steps:
            raise ValueError(
                f"{num_steps} more steps from step {self.step} exceed train.max_steps "
                f"({max_steps}); raise train.max_steps or run fewer steps"
            )
        records = []
        interval = self.recipe.train.checkpoint_interval
        val_interval = self.recipe.train.validation_interval
        for _ in range(num_steps):
            records.append(self.train_step())
            last = self.step == max_steps
            if self.validator is not None and (
                last or (val_interval and self.step % val_interval == 0)
            ):
                self.validate()
            if interval and self.step % interval == 0:
                self.save_checkpoint()
            if last:
                self._finish()
        return records

    def validate(self) -> Any:
        """Run the validator at the current step; its images go to the tracker."""
        if self.validator is None:
            raise ValueError("this Trainer has no validator; pass validator= to build one")
        start = time.perf_counter()
        if "generator" in self.networks:  # a shared network runs as the generator
            prepare_network(self.method, "generator")
        result = self.validator(self)
        if self.tracker is not None:
            images = getattr(result, "images", None) or {}
            if images:
                self.tracker.log_images(images, self.step)
            self.tracker.log_metrics({"validation/seconds": time.perf_counter() - start}, self.step)
        return result

    def _finish(self) -> None:
        """After the last step: plot the loss curves, close the tracker."""
        from fastwan.train.plots import plot_loss_curves

        if self._distributed and not self.parallel.is_main:
            return
        if any(k.endswith("_loss") for r in self.history for k in r):
            plot_loss_curves(self.history, self.output_dir / LOSS_PLOT_FILE)
        if self.tracker is not None:
            self.tracker.close()

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Atomically write ``<output_dir>/checkpoint-<step>`` (DCP, with this step's
        ``recipe.yaml``); prunes old ones to ``train.checkpoints_total_limit``. Returns the
        directory. With more than one process every rank must call it."""
        path = save_training_checkpoint(
            checkpoint_dir(self.output_dir, self.step),
            self._checkpoint_state(),
            parallel=self.parallel,
            metadata={"step": self.step, "method": self.method.name},
            extra_files={RECIPE_FILE: lambda file: dump_recipe(self.recipe, file)},
        )
        limit = self.recipe.train.checkpoints_total_limit
        if limit is not None and (not self._distributed or self.parallel.is_main):
            prune_checkpoints(self.output_dir, limit)
        if self._distributed:
            self.parallel.barrier()
        return path

    def _checkpoint_state(self) -> TrainingState:
        """The live objects a checkpoint saves and loads (:mod:`fastwan.train.checkpoint`)."""
        return TrainingState(
            networks=self.networks,
            optimizers=self.optimizers,
            schedulers=self.schedulers,
            trainer=PlainState(self._counters, self._restore_counters),
            generators={_GENERATOR_NAME: self.rng},
            ema={"generator": self.ema} if self.ema is not None else {},
            data=self.data,  # its position, when it has state_dict / load_state_dict
            parameters=self._partly_trained(),
        )

    def _partly_trained(self) -> dict[str, list[str]]:
        """Role -> the names it trains, for roles that train part of their network (e.g.
        a LoRA adapter): their checkpoint holds those alone, the rest comes from the
        model folder as when the run started."""
        out = {}
        for role, net in self.networks.items():
            if len(self._trained[role]) < sum(1 for _ in net.parameters()):
                out[role] = list(self._trained[role])
        return out

    def _counters(self) -> dict[str, Any]:
        return {"method": self.method.name, "step": self.step, "history": self.history}

    def _restore_counters(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.history = list(state["history"])

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Load a checkpoint (default: the latest complete one under ``output_dir``);
        returns its path, or None when there is none to resume from.

        The recipe is compared with the checkpoint's first (see the module docstring):
        unsafe changes raise a :class:`~fastwan.config.ConfigError` before anything
        is loaded; safe ones are applied, logged and recorded."""
        path = resolve_resume("latest" if path is None else path, self.output_dir)
        if path is None:
            return None
        changes = check_resume(self.recipe, path)
        self._load_checkpoint(path)
        self._rebuild_row_counts()
        if changes:
            self._apply_changes(path, changes)
        return path

    def _apply_changes(self, path: Path, changes: Mapping[str, tuple[Any, Any]]) -> None:
        """Write the new learning rates / weight decays (and a re-spread schedule for a new
        ``train.max_steps``) into the restored optimizers; log and record every change."""
        applied: dict[str, str] = {}
        for role, opt in self.optimizers.items():
            keys = (f"optim.{role}.lr", f"optim.{role}.weight_decay", "train.max_steps")
            if not any(k in changes for k in keys):
                continue
            cfg = getattr(self.recipe.optim, role)
            sched = self.schedulers[role]
            old_lr = [g["lr"] for g in opt.param_groups]
            sched.base_lrs = [cfg.lr] * len(opt.param_groups)
            for group, factor in zip(opt.param_groups, sched.lr_lambdas):
                group["initial_lr"] = cfg.lr
                group["lr"] = cfg.lr * factor(sched.last_epoch)
                group["weight_decay"] = cfg.weight_decay
            sched._last_lr = [g["lr"] for g in opt.param_groups]
            if old_lr[0] != opt.param_groups[0]["lr"]:
                applied[f"optim.{role}.lr"] = (
                    f"the next {role} update uses lr {opt.param_groups[0]['lr']:.4g} (was "
                    f"{old_lr[0]:.4g}); the schedule keeps its position"
                )
        listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        record = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "step": self.step,
            "checkpoint": str(path),
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
            "applied": applied,
        }
        target = self.output_dir / RECIPE_CHANGES_FILE
        if not self._distributed or self.parallel.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(target, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        extra = "".join(f"; {text}" for text in applied.values())
        self.log_fn(
            f"resumed from {path} at step {self.step} with recipe changes: {listed}{extra} "
            f"(recorded in {target})"
        )

    def _load_checkpoint(self, path: Path) -> None:
        marker = check_checkpoint(path)
        if marker.get("method") != self.method.name:
            raise ValueError(
                f"checkpoint {str(path)!r} was written by method {marker.get('method')!r}, not "
                f"{self.method.name!r}; set train.method: {marker.get('method')}"
            )
        if int(marker.get("step", 0)) > self.recipe.train.max_steps:
            raise ValueError(
                f"checkpoint step {marker['step']} exceeds train.max_steps "
                f"({self.recipe.train.max_steps}); raise train.max_steps"
            )
        # any mesh or one process, whatever saved it (DCP reshards)
        load_training_checkpoint(
            path, self._checkpoint_state(), parallel=self.parallel, seed=self.recipe.train.seed
        )
        self._data_iter = None
        self.method.set_step(self.step)
