"""Plots of a training run's log history (PNG through matplotlib's Agg canvas).

Only ``matplotlib.figure.Figure`` is used -- no ``pyplot``, so no global figure state and
no GUI backend is touched; safe in training processes and tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["loss_series", "plot_loss_curves"]


def loss_series(
    history: Iterable[Mapping[str, Any]], keys: Sequence[str] | None = None
) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for every ``*_loss`` key of the records (or ``keys``);
    a record without the key (e.g. a step without a generator update) is skipped, and so
    are non-finite values."""
    records = list(history)
    if keys is None:
        seen: dict[str, None] = {}
        for r in records:
            for k in r:
                if k.endswith("_loss"):
                    seen[k] = None
        keys = list(seen)
    out: dict[str, tuple[list[int], list[float]]] = {}
    for key in keys:
        steps, values = [], []
        for i, r in enumerate(records):
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(int(r.get("step", i + 1)))
                values.append(float(v))
        out[key] = (steps, values)
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (the first points average fewer)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(
    history: Iterable[Mapping[str, Any]],
    path: str | Path,
    *,
    keys: Sequence[str] | None = None,
    title: str | None = None,
    smooth: int | None = None,
    log_scale: bool | None = None,
    dpi: int = 100,
) -> Path:
    """Plot loss curves of a log history to a PNG at ``path``; one panel per loss.

    history: records as :class:`fastwan.train.trainer.Trainer` keeps them (``{"step": n,
        "critic_loss": ..., ...}``). keys: which keys to plot (default every ``*_loss``).
    smooth: also draw a trailing moving average over this many steps (default: 1/20 of
        the run when it has more than 40 points). log_scale: a log y axis (default: when
        all values are positive and span more than 100x).
    Returns the path. Raises ValueError when there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = {k: v for k, v in loss_series(history, keys).items() if v[0]}
    if not series:
        raise ValueError(
            "history has no finite loss values to plot; pass records with '*_loss' keys "
            "(or keys= naming the ones to plot)"
        )
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 10:
        raise ValueError(f"dpi must be an int >= 10, got {dpi!r}")
    n = len(series)
    fig = Figure(figsize=(6.0, 2.6 * n), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, (key, (steps, values)) in zip(axes, series.items()):
        window = smooth if smooth is not None else (len(values) // 20 if len(values) > 40 else 1)
        ax.plot(steps, values, color="tab:blue", alpha=0.35 if window > 1 else 1.0, lw=1)
        if window > 1:
            ax.plot(steps, _smooth(values, window), color="tab:blue", lw=1.6, label=f"avg {window}")
            ax.legend(loc="upper right", fontsize=8)
        use_log = log_scale
        if use_log is None:
            lo, hi = min(values), max(values)
            use_log = lo > 0 and hi / lo > 100
        if use_log:
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
