"""``fastwan demo``: sparse distillation, end to end, on the toy world, on a CPU.

1. The shipped teacher (50 steps, dense, CFG) and the shipped student (3 steps, VSA)
   generate the held-out evaluation prompts; both are timed in this run and scored by the
   probe: attribute accuracy, Frechet distance, diversity.
2. A short live sparse distillation from the teacher (recipes/toy_distill.yaml, fewer
   steps, the same trainer): the 3-step VSA student's scores before and after.
3. Side-by-side clips (MP4 + GIF), a contact sheet and plots (PNG), all numbers (JSON) in
   the output folder.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastwan.toy import world

__all__ = ["DemoSettings", "GOALS", "check_goals", "run_demo", "format_table", "TABLE_COLUMNS"]

TABLE_COLUMNS = (
    "model",
    "steps",
    "attention",
    "sec_per_clip",
    "speedup",
    "accuracy",
    "frechet",
    "diversity",
)
_UPSCALE = 8  # pixels per toy pixel in the written clips

# The toy world's quality and speed bars (issue 7), checked on the shipped models.
GOALS = {
    "teacher_accuracy": 0.9,  # teacher mean attribute accuracy, at least
    "student_accuracy_ratio": 0.95,  # student accuracy / teacher accuracy, at least
    "student_frechet_ratio": 1.5,  # student Frechet distance / teacher's, at most
    "student_diversity": 0.5,  # student within-prompt spread / real clips', at least
    "student_speedup": 15.0,  # teacher seconds per clip / student's, at least
}


_CEILINGS = {"student_frechet_ratio"}  # the other goals are floors


def check_goals(teacher: dict, student: dict) -> list[dict]:
    """Each bar of :data:`GOALS` for a teacher row and a student row of the demo's table:
    ``{"goal", "value", "cmp", "target", "met"}`` (``cmp``: ``">="`` for a floor, ``"<="``
    for a ceiling)."""
    values = {
        "teacher_accuracy": teacher["accuracy"],
        "student_accuracy_ratio": student["accuracy"] / max(teacher["accuracy"], 1e-12),
        "student_frechet_ratio": student["frechet"] / max(teacher["frechet"], 1e-12),
        "student_diversity": student["diversity"],
        "student_speedup": teacher["sec_per_clip"] / student["sec_per_clip"],
    }
    out = []
    for goal, target in GOALS.items():
        value = float(values[goal])
        cmp = "<=" if goal in _CEILINGS else ">="
        met = value <= target if cmp == "<=" else value >= target
        out.append({"goal": goal, "value": value, "cmp": cmp, "target": target, "met": bool(met)})
    return out


@dataclass
class DemoSettings:
    """What one demo run does (``quick``: the CI-sized run)."""

    out_dir: Path
    quick: bool = False
    seeds_per_prompt: int = 4
    real_seeds_per_prompt: int = 8
    live_steps: int = 100
    live_batch: int = 16
    seed: int = 0
    teacher: str = "toy-teacher"
    student: str = "toy-student"
    progress: bool = True

    @classmethod
    def make(cls, out_dir: str | Path, *, quick: bool = False, **overrides: Any) -> DemoSettings:
        base = dict(seeds_per_prompt=2, real_seeds_per_prompt=4, live_steps=10, live_batch=8)
        values = {
            **(base if quick else {}),
            **{k: v for k, v in overrides.items() if v is not None},
        }
        settings = cls(out_dir=Path(out_dir), quick=quick, **values)
        for name in ("seeds_per_prompt", "real_seeds_per_prompt", "live_batch"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2, got {value!r}")
        if isinstance(settings.live_steps, bool) or not isinstance(settings.live_steps, int):
            raise ValueError(f"live_steps must be an int, got {settings.live_steps!r}")
        if settings.live_steps < 0:
            raise ValueError("live_steps must be >= 0 (0 skips the live distillation)")
        return settings


def _recipes_dir() -> Path:
    import fastwan

    path = Path(fastwan.__file__).resolve().parents[1] / "recipes"
    if not (path / "toy_distill.yaml").is_file():
        raise ValueError(
            f"recipes/toy_distill.yaml not found next to the fastwan package ({path}); run the "
            "demo from a source checkout (pip install -e .)"
        )
    return path


def _generate(gen, prompts: list[str], seed: int, **kwargs) -> tuple[np.ndarray, float]:
    """All clips in one batch from one seeded generator (every model gets the same initial
    noise); returns frames ``[N, T, H, W, 3]`` and wall seconds."""
    start = time.perf_counter()
    out = gen.generate(prompts, seed=seed, **kwargs)
    return out.frames, time.perf_counter() - start


def _eval_set(settings: DemoSettings) -> tuple[list[world.Combo], list[str], list[int]]:
    """The held-out combinations, ``seeds_per_prompt`` clips each: combos, prompts, and
    the prompt index of every clip."""
    combos = sorted(world.HELD_OUT, key=world.canonical_prompt)
    rows, prompts, groups = [], [], []
    for g, combo in enumerate(combos):
        for _ in range(settings.seeds_per_prompt):
            rows.append(combo)
            prompts.append(world.canonical_prompt(combo))
            groups.append(g)
    return rows, prompts, groups


def _write_side_by_side(
    out_dir: Path, prompts: Sequence[str], columns: dict[str, np.ndarray], fps: int
) -> list[str]:
    """One MP4 + GIF per prompt: the models' clips side by side under the prompt."""
    from PIL import Image, ImageDraw

    from fastwan.video_io import save_video

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    size = world.SIZE * _UPSCALE
    header = 28
    for i, prompt in enumerate(prompts):
        frames = []
        for f in range(world.NUM_FRAMES):
            canvas = Image.new("RGB", (size * len(columns), size + header), (255, 255, 255))
            draw = ImageDraw.Draw(canvas)
            draw.text((4, 2), prompt, fill=(0, 0, 0))
            for c, (name, clips) in enumerate(columns.items()):
                tile = (np.clip(clips[i][f], 0, 1) * 255).astype(np.uint8)
                img = Image.fromarray(tile).resize((size, size), Image.NEAREST)
                canvas.paste(img, (c * size, header))
                draw.text((c * size + 4, 15), name, fill=(90, 90, 90))
            frames.append(np.asarray(canvas))
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
        for ext in ("mp4", "gif"):
            path = out_dir / f"{i:02d}-{slug}.{ext}"
            save_video(np.stack(frames), path, fps=fps)
            written.append(str(path))
    return written


def _contact_sheet(path: Path, prompts: Sequence[str], columns: dict[str, np.ndarray]) -> None:
    """A PNG: per prompt, one row of frames per model."""
    from PIL import Image

    rows = []
    for i in range(len(prompts)):
        for clips in columns.values():
            rows.append(np.concatenate(list(np.clip(clips[i], 0, 1)), axis=1))  # [H, T W, 3]
    sheet = (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
    img = Image.fromarray(sheet)
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    img.save(path)


def _plot(path: Path, rows: list[dict], history: list[dict]) -> None:
    """Loss curves of the live distillation and speed vs quality of every model."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    from fastwan.train.plots import loss_series

    fig = Figure(figsize=(11, 4.2), dpi=110)
    ax_loss, ax_sq = fig.subplots(1, 2)
    if history:
        for key, (steps, values) in loss_series(history).items():
            if values:
                ax_loss.plot(steps, values, marker=".", label=key)
        ax_loss.legend()
    else:
        ax_loss.text(0.5, 0.5, "no live distillation", ha="center", va="center")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("live sparse distillation (DMD + VSA)")
    for row in rows:
        ax_sq.scatter(row["sec_per_clip"], row["accuracy"], s=40)
        ax_sq.annotate(row["model"], (row["sec_per_clip"], row["accuracy"]), fontsize=8)
    ax_sq.set_xscale("log")
    # labels at 1-2-5 steps in plain seconds: matplotlib's default minor labels collide
    ax_sq.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_sq.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_sq.xaxis.set_minor_formatter(NullFormatter())
    ax_sq.set_xlabel("seconds per clip (log)")
    ax_sq.set_ylabel("mean attribute accuracy")
    ax_sq.set_title("speed vs quality (held-out prompts)")
    fig.tight_layout()
    fig.savefig(path)


def format_table(rows: list[dict]) -> str:
    """The demo's table as text."""
    header = [
        "model",
        "steps",
        "attention",
        "s/clip",
        "speedup",
        "accuracy",
        "Frechet",
        "diversity",
    ]
    lines = []
    for r in rows:
        lines.append(
            [
                r["model"],
                str(r["steps"]),
                r["attention"],
                f"{r['sec_per_clip']:.4f}",
                f"{r['speedup']:.1f}x",
                f"{r['accuracy']:.3f}",
                f"{r['frechet']:.2f}",
                f"{r['diversity']:.2f}",
            ]
        )
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``results.json``) every number."""
    from fastwan.pipeline import VideoGenerator
    from fastwan.toy.metrics import real_clips, score_clips
    from fastwan.toy.probe import load_probe

    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    combos, prompts, groups = _eval_set(settings)
    log(
        f"[1/3] held-out evaluation: {len(set(prompts))} prompts never seen in training x "
        f"{settings.seeds_per_prompt} seeds"
    )
    probe = load_probe()
    held_out = sorted(world.HELD_OUT, key=world.canonical_prompt)
    real_combos = [c for c in held_out for _ in range(settings.real_seeds_per_prompt)]
    real_groups = [g for g in range(len(held_out)) for _ in range(settings.real_seeds_per_prompt)]
    real = real_clips(real_combos, seed=settings.seed + 777)

    def row(model: str, steps: int, attention: str, seconds: float, clips: np.ndarray) -> dict:
        scores = score_clips(probe, clips, combos, groups, real, real_groups)
        return dict(
            model=model,
            steps=steps,
            attention=attention,
            sec_per_clip=seconds / len(prompts),
            **scores,
        )

    teacher = VideoGenerator.from_pretrained(settings.teacher, preset="toy-teacher", device="cpu")
    student = VideoGenerator.from_pretrained(settings.student, preset="toy-student", device="cpu")
    p_t, p_s = teacher.preset, student.preset
    rows: list[dict] = []
    clips_by_model: dict[str, np.ndarray] = {}
    # Warm-up (allocator, kernels) outside the timed runs.
    teacher.generate(prompts[:1], seed=0, num_inference_steps=2)
    student.generate(prompts[:1], seed=0)
    t_clips, t_sec = _generate(teacher, prompts, settings.seed)
    s_clips, s_sec = _generate(student, prompts, settings.seed)
    sparse = f"VSA {p_s.sparsity:g}"
    t_row = row(
        "teacher",
        p_t.num_inference_steps,
        f"dense, CFG {p_t.guidance_scale:g}",
        t_sec,
        t_clips,
    )
    s_row = row("student (shipped)", len(p_s.timesteps), sparse, s_sec, s_clips)
    rows += [t_row, s_row]
    clips_by_model["teacher"] = t_clips
    clips_by_model["student"] = s_clips
    log(f"      teacher {t_sec:.1f}s, student {s_sec:.2f}s for {len(prompts)} clips")

    # 2. Live sparse distillation from the teacher.
    history: list[dict] = []
    if settings.live_steps > 0:
        log(
            f"[2/3] live sparse distillation: {settings.live_steps} DMD steps "
            "(recipes/toy_distill.yaml)"
        )
        before = VideoGenerator.from_pretrained(
            settings.teacher, preset="toy-student", device="cpu"
        )
        b_clips, b_sec = _generate(before, prompts, settings.seed)
        rows.append(
            row("student before (teacher weights)", len(p_s.timesteps), sparse, b_sec, b_clips)
        )
        history, live_state = _live_distill(settings)
        before.transformer.load_state_dict(live_state)
        a_clips, a_sec = _generate(before, prompts, settings.seed)
        name = f"student after {settings.live_steps} live steps"
        rows.append(row(name, len(p_s.timesteps), sparse, a_sec, a_clips))
        clips_by_model["live"] = a_clips
    else:
        log("[2/3] live distillation skipped (--live-steps 0)")

    for row in rows:
        row["speedup"] = t_row["sec_per_clip"] / row["sec_per_clip"]
        row["accuracy"] = row["accuracy_mean"]

    # 3. Pictures and numbers.
    log(f"[3/3] writing clips, plots and numbers to {out}")
    first = [g * settings.seeds_per_prompt for g in range(len(set(groups)))]
    columns = {name: clips[first] for name, clips in clips_by_model.items()}
    first_prompts = [prompts[i] for i in first]
    videos = _write_side_by_side(out / "clips", first_prompts, columns, fps=p_t.fps)
    _contact_sheet(out / "contact_sheet.png", first_prompts, columns)
    _plot(out / "plots.png", rows, history)
    results = {
        "settings": {
            "quick": settings.quick,
            "seeds_per_prompt": settings.seeds_per_prompt,
            "real_seeds_per_prompt": settings.real_seeds_per_prompt,
            "live_steps": settings.live_steps,
            "seed": settings.seed,
            "threads": torch.get_num_threads(),
        },
        "held_out_prompts": sorted(set(prompts)),
        "rows": rows,
        "goals": check_goals(t_row, s_row),
        "live_history": history,
        "files": {"videos": videos, "contact_sheet": "contact_sheet.png", "plots": "plots.png"},
        "seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(_finite(results), indent=2) + "\n")
    log("")
    log(format_table(rows))
    log("\nshipped models against the goals:")
    for g in results["goals"]:
        mark = "met" if g["met"] else "NOT met"
        log(f"  {g['goal']:<24} {g['value']:8.3f}  (goal {g['cmp']} {g['target']:g})  {mark}")
    log(f"\ndone in {results['seconds']:.0f}s; results in {out}")
    return results


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _live_distill(settings: DemoSettings) -> tuple[list[dict], dict]:
    """Run recipes/toy_distill.yaml for ``live_steps`` steps from the teacher; returns the
    log history and the trained generator's weights."""
    from fastwan.config import load_recipe
    from fastwan.models.loading import resolve_model_path
    from fastwan.toy.data import write_prompt_dataset
    from fastwan.train.build import build_trainer

    teacher_path = resolve_model_path(settings.teacher)
    live = settings.out_dir / "live"
    prompts_dir = live / "prompts"
    write_prompt_dataset(
        prompts_dir, teacher_path, num_prompts=512, seed=settings.seed + 1, progress=False
    )
    recipe = load_recipe(
        _recipes_dir() / "toy_distill.yaml",
        [
            f"model.teacher={teacher_path}",
            f"data.path={prompts_dir}",
            f"train.output_dir={live / 'run'}",
            f"train.max_steps={settings.live_steps}",
            f"train.micro_batch_size={settings.live_batch}",
            f"train.global_batch_size={settings.live_batch}",
            "train.ema_decay=null",
            "train.ema_start_step=0",
            "train.checkpoint_interval=0",
            f"train.log_interval={max(1, settings.live_steps // 10)}",
            f"train.seed={settings.seed}",
            "train.report_to=[]",
        ],
    )
    setup = build_trainer(recipe, device="cpu", log_fn=lambda line: None)
    trainer = setup.trainer
    from tqdm import tqdm

    bar = tqdm(
        total=settings.live_steps,
        desc="live distill",
        unit="step",
        disable=not settings.progress,
        file=sys.stderr,
    )
    for _ in range(settings.live_steps):
        record = trainer.train_step()
        bar.set_postfix(
            {k: f"{v:.3g}" for k, v in record.items() if k in ("generator_loss", "critic_loss")},
            refresh=False,
        )
        bar.update(1)
    bar.close()
    state = {k: v.detach().clone() for k, v in trainer.networks["generator"].state_dict().items()}
    return list(trainer.history), state
