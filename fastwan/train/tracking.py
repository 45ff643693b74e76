"""Metric sinks of a training run (``train.report_to``), besides the console line the
:class:`~fastwan.train.trainer.Trainer` prints itself.

* :class:`TensorBoardTracker`: ``torch.utils.tensorboard.SummaryWriter`` event files under
  ``<output_dir>/logs`` (``tensorboard --logdir <output_dir>/logs``);
* :class:`WandbTracker`: a Weights & Biases run (when ``wandb`` is installed);
* :class:`Trackers`: fans out to several; :func:`build_trackers` makes them from a recipe.

Every sink takes ``log_metrics({tag: float}, step)`` and ``log_images({tag: [H, W, 3]
uint8}, step)``; tags look like ``train/critic_loss``, ``validation/grid``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastwan.config import Recipe, recipe_to_dict

__all__ = [
    "LOG_DIR",
    "TensorBoardTracker",
    "Trackers",
    "WandbTracker",
    "build_trackers",
]

LOG_DIR = "logs"


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only (bools and non-finite values dropped: sinks reject or mis-plot them)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def _image(array: Any) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [H, W, 3], got {arr.shape} {arr.dtype}")
    return arr


class TensorBoardTracker:
    """Scalars and images to TensorBoard event files in ``log_dir``.

    The writer opens at the first logged step ``n`` with ``purge_step=n``: a resumed run
    logging into the same folder hides what an earlier (crashed) run logged from step
    ``n`` on, so the curves show each step once.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(
                "train.report_to includes 'tensorboard' but the tensorboard package is not "
                "installed: pip install 'tensorboard>=2.14' (or remove it from train.report_to)"
            ) from err
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer = None

    def _open(self, step: int):
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=step)
        return self.writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = _finite(metrics)
        if values:
            writer = self._open(step)
            for tag, value in values.items():
                writer.add_scalar(tag, value, global_step=step)

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        for tag, image in images.items():
            array = _image(image)  # [H, W, 3] uint8, checked before a writer opens
            self._open(step).add_image(tag, array, global_step=step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """A Weights & Biases run: ``wandb.init(project=..., config=recipe)``; metrics and
    images logged at the training step."""

    def __init__(
        self,
        project: str,
        *,
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
        directory: str | Path | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ValueError(
                "train.report_to includes 'wandb' but wandb is not installed: pip install wandb "
                "(and `wandb login`), or remove 'wandb' from train.report_to"
            ) from err
        self._wandb = wandb
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=name,
            config=dict(config) if config is not None else None,
            dir=str(directory) if directory is not None else None,
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = _finite(metrics)
        if values:
            self.run.log(values, step=step)

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        media = {tag: self._wandb.Image(_image(img)) for tag, img in images.items()}
        if media:
            self.run.log(media, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Several sinks behind one interface (none: every call does nothing)."""

    def __init__(self, sinks: Sequence[Any] = ()) -> None:
        self.sinks = list(sinks)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step)

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log_images(images, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_trackers(recipe: Recipe, output_dir: str | Path | None = None) -> Trackers:
    """The sinks of ``recipe.train.report_to``: TensorBoard under ``<output_dir>/logs``,
    wandb in project ``train.tracker_project`` (run named after the output folder, the
    recipe as its config). A sink whose package is missing raises a ValueError naming
    ``train.report_to`` and the fix."""
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    out = Path(output_dir if output_dir is not None else recipe.train.output_dir)
    sinks: list[Any] = []
    for name in recipe.train.report_to:
        if name == "tensorboard":
            sinks.append(TensorBoardTracker(out / LOG_DIR))
        elif name == "wandb":
            sinks.append(
                WandbTracker(
                    recipe.train.tracker_project,
                    config=recipe_to_dict(recipe),
                    name=out.name,
                    directory=out,
                )
            )
        else:  # the config refuses other names; a hand-made TrainConfig might not
            raise ValueError(f"train.report_to: unknown tracker {name!r}; use tensorboard, wandb")
    return Trackers(sinks)
