"""``fastwan demo``: sparse distillation, end to end, on the toy world, on a CPU.

1. The shipped teacher (50 steps, dense, CFG) and the shipped student (3 steps, VSA)
   generate the held-out evaluation prompts; both are timed in this run and scored by the
   probe: attribute accuracy, Frechet distance, diversity.
2. A short live sparse distillation from the teacher (recipes/toy_distill.yaml, fewer
   steps, the same trainer): the 3-step VSA student's scores before and after.
3. Side-by-side clips (MP4 + GIF), a labelled contact sheet (real clip, teacher, student
   per prompt) and plots (PNG), all numbers (JSON) in the output folder.
4. Image to video: the shipped toy I2V teacher (50 steps, dense, CFG) and its 3-step VSA
   student are given the first frame of a real clip of each held-out item and the prompt;
   scored on keeping that frame, moving as the prompt says and as far as real clips move
   (fastwan.toy.i2v), against :data:`fastwan.toy.i2v.I2V_GOALS`; a contact sheet with the
   given frame above each model's clip.
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

__all__ = [
    "DemoSettings",
    "GOALS",
    "I2V_COLUMNS",
    "TABLE_COLUMNS",
    "check_goals",
    "contact_sheet",
    "format_i2v_table",
    "format_table",
    "run_demo",
]

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

# The toy world's quality and speed bars (issues 7 and 18), checked on the shipped models.
GOALS = {
    "teacher_accuracy": 0.97,  # teacher mean attribute accuracy, at least
    "teacher_shape_accuracy": 0.9,  # the attribute a weak teacher misses first, at least
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
        "teacher_shape_accuracy": teacher["accuracy_shape"],
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
    i2v: bool = True  # also the image-to-video part (the shipped toy I2V pair)
    i2v_teacher: str = "toy-i2v-teacher"
    i2v_student: str = "toy-i2v-student"
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


def contact_sheet(
    path: Path,
    prompts: Sequence[str],
    columns: dict[str, np.ndarray],
    given: np.ndarray | None = None,
    scale: int = 4,
) -> None:
    """A labelled PNG: per prompt, a header with the prompt, then one row of frames per
    model (``columns``: name -> clips ``[N, T, H, W, 3]``, one clip per prompt), each row
    named on its left; ``given`` ``[N, H, W, 3]``: the image-to-video condition, shown as a
    first row ("given frame")."""
    from PIL import Image, ImageDraw

    if given is not None and len(given) != len(prompts):
        raise ValueError(f"given has {len(given)} frames for {len(prompts)} prompts")
    for name, clips in columns.items():
        if len(clips) != len(prompts):
            raise ValueError(f"column {name!r} has {len(clips)} clips for {len(prompts)} prompts")
    label_w, header, gap = 130, 18, 6
    tile = world.SIZE * scale
    width = label_w + tile * world.NUM_FRAMES
    rows_per_prompt = len(columns) + (given is not None)
    height = len(prompts) * (header + rows_per_prompt * tile + gap)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def paste_row(y: int, name: str, frames: np.ndarray) -> None:
        draw.text((4, y + tile // 2 - 6), name, fill=(60, 60, 60))
        for f, frame in enumerate(frames):
            img = Image.fromarray((np.clip(frame, 0, 1) * 255).astype(np.uint8))
            sheet.paste(img.resize((tile, tile), Image.NEAREST), (label_w + f * tile, y))

    y = 0
    for i, prompt in enumerate(prompts):
        draw.text((4, y + 3), f"{i + 1}. {prompt}", fill=(0, 0, 0))
        y += header
        if given is not None:
            paste_row(y, "given frame", given[i][None])
            y += tile
        for name, clips in columns.items():
            paste_row(y, name, clips[i])
            y += tile
        y += gap
    sheet.save(path)


def _plot(path: Path, rows: list[dict], history: list[dict], i2v_rows: list[dict]) -> None:
    """Loss curves of the live distillation, speed vs quality of every model and, with
    ``i2v_rows``, the image-to-video measures of the I2V teacher and student."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    from fastwan.train.plots import loss_series

    fig = Figure(figsize=(16.5 if i2v_rows else 11, 4.2), dpi=110)
    axes = fig.subplots(1, 3 if i2v_rows else 2)
    ax_loss, ax_sq = axes[0], axes[1]
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
    ax_sq.set_title("text to video: speed vs quality (held-out prompts)")
    if i2v_rows:
        ax = axes[2]
        measures = [
            ("direction_accuracy", "direction\naccuracy"),
            ("first_frame_attributes", "first frame\nkept"),
            ("motion_ratio", "motion /\nreal clips"),
        ]
        width = 0.8 / len(i2v_rows)
        for j, row in enumerate(i2v_rows):
            xs = [i + (j - (len(i2v_rows) - 1) / 2) * width for i in range(len(measures))]
            label = f"{row['model']} ({row['steps']} steps, {row['sec_per_clip']:.3f} s/clip)"
            ax.bar(xs, [row[k] for k, _ in measures], width, label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(measures)), [name for _, name in measures])
        ax.set_ylabel("fraction (motion: ratio; 1 = as real clips)")
        ax.set_title("image to video (held-out prompts)")
        ax.legend(fontsize=7, loc="lower right")
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


I2V_COLUMNS = (
    "model",
    "steps",
    "attention",
    "sec_per_clip",
    "speedup",
    "first_frame_attributes",
    "first_frame_psnr",
    "direction_accuracy",
    "motion_ratio",
    "frechet",
    "diversity",
)


def format_i2v_table(rows: list[dict]) -> str:
    """The demo's image-to-video table as text."""
    header = ["model", "steps", "attention", "s/clip", "speedup", "first frame", "PSNR dB",
              "direction", "motion/real", "Frechet", "diversity"]  # fmt: skip
    lines = [
        [
            r["model"],
            str(r["steps"]),
            r["attention"],
            f"{r['sec_per_clip']:.4f}",
            f"{r['speedup']:.1f}x",
            f"{r['first_frame_attributes']:.3f}",
            f"{r['first_frame_psnr']:.1f}",
            f"{r['direction_accuracy']:.3f}",
            f"{r['motion_ratio']:.3f}",
            f"{r['frechet']:.2f}",
            f"{r['diversity']:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def _log_goals(goals: list[dict], log: Callable[[str], None]) -> None:
    for g in goals:
        mark = "met" if g["met"] else "NOT met"
        log(f"  {g['goal']:<24} {g['value']:8.3f}  (goal {g['cmp']} {g['target']:g})  {mark}")


def _image_to_video(
    settings: DemoSettings, probe, log: Callable[[str], None]
) -> tuple[list[dict], list[dict], dict[str, str]]:
    """The shipped toy I2V teacher and student on held-out prompts, each item's first frame
    given from a real image-to-video clip of it (fastwan.toy.i2v): their rows, the
    :data:`~fastwan.toy.i2v.I2V_GOALS` checked, and the files written."""
    from PIL import Image

    from fastwan.pipeline import VideoGenerator
    from fastwan.toy import i2v

    held_out = sorted(world.HELD_OUT, key=world.canonical_prompt)
    rng = np.random.default_rng(settings.seed + 2024)
    combos = [c for c in held_out for _ in range(settings.seeds_per_prompt)]
    groups = [g for g in range(len(held_out)) for _ in range(settings.seeds_per_prompt)]
    real = i2v.render_i2v_batch(combos, rng.integers(0, 2**31, len(combos)))  # [N, T, H, W, 3]
    given = real[:, 0]  # [N, H, W, 3]: the first frames the models are given
    images = [Image.fromarray((g * 255).round().astype(np.uint8)) for g in given]
    prompts = [world.canonical_prompt(c) for c in combos]
    models = (
        ("teacher", settings.i2v_teacher, "toy-i2v-teacher"),
        ("student (shipped)", settings.i2v_student, "toy-i2v-student"),
    )
    rows, clips_by_model = [], {}
    for name, source, preset in models:
        gen = VideoGenerator.from_pretrained(source, preset=preset, device="cpu")
        p = gen.preset
        warm = {} if p.few_step else {"num_inference_steps": 2}
        gen.generate(prompts[0], image=images[0], seed=0, **warm)  # warm-up, untimed
        start = time.perf_counter()
        # one batched call: each prompt with its own first frame
        clips = gen.generate(prompts, image=images, seed=settings.seed).frames
        seconds = time.perf_counter() - start
        scores = i2v.score_i2v(
            clips, combos, given, real, probe=probe, groups=groups, real_groups=groups
        )
        steps = len(p.timesteps) if p.few_step else p.num_inference_steps
        attention = (
            f"VSA {p.sparsity:g}" if p.attention == "vsa" else f"dense, CFG {p.guidance_scale:g}"
        )
        rows.append(
            dict(
                model=name,
                steps=steps,
                attention=attention,
                sec_per_clip=seconds / len(prompts),
                **scores,
            )
        )
        clips_by_model[name] = clips
        log(f"      {name} {seconds:.1f}s for {len(prompts)} clips")
    for row in rows:
        row["speedup"] = rows[0]["sec_per_clip"] / row["sec_per_clip"]
    first = [g * settings.seeds_per_prompt for g in range(len(held_out))]
    columns = {"real clip": real[first]}
    columns.update({name: clips[first] for name, clips in clips_by_model.items()})
    first_prompts = [prompts[i] for i in first]
    out = settings.out_dir
    contact_sheet(out / "contact_sheet_i2v.png", first_prompts, columns, given=given[first])
    videos = _write_side_by_side(out / "clips_i2v", first_prompts, columns, fps=8)
    files = {"contact_sheet_i2v": "contact_sheet_i2v.png", "videos_i2v": videos}
    return rows, i2v.check_i2v_goals(rows[0], rows[1]), files


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``results.json``) every number."""
    from fastwan.pipeline import VideoGenerator
    from fastwan.toy.metrics import real_clips, score_clips
    from fastwan.toy.probe import load_probe

    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    combos, prompts, groups = _eval_set(settings)
    n_steps = 4 if settings.i2v else 3
    log(
        f"[1/{n_steps}] held-out evaluation: {len(set(prompts))} prompts never seen in training x "
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
            f"[2/{n_steps}] live sparse distillation: {settings.live_steps} DMD steps "
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
        log(f"[2/{n_steps}] live distillation skipped (--live-steps 0)")

    for row in rows:
        row["speedup"] = t_row["sec_per_clip"] / row["sec_per_clip"]
        row["accuracy"] = row["accuracy_mean"]

    # 3. Pictures and numbers.
    log(f"[3/{n_steps}] writing clips, plots and numbers to {out}")
    first = [g * settings.seeds_per_prompt for g in range(len(set(groups)))]
    real_first = [g * settings.real_seeds_per_prompt for g in range(len(held_out))]
    columns = {"real clip": real[real_first]}
    columns.update({name: clips[first] for name, clips in clips_by_model.items()})
    first_prompts = [prompts[i] for i in first]
    videos = _write_side_by_side(out / "clips", first_prompts, columns, fps=p_t.fps)
    contact_sheet(out / "contact_sheet.png", first_prompts, columns)
    files = {"videos": videos, "contact_sheet": "contact_sheet.png", "plots": "plots.png"}
    i2v_rows: list[dict] = []
    i2v_goals: list[dict] = []
    if settings.i2v:
        log("[4/4] image to video: the given first frame kept, the prompt's motion made")
        i2v_rows, i2v_goals, i2v_files = _image_to_video(settings, probe, log)
        files.update(i2v_files)
    _plot(out / "plots.png", rows, history, i2v_rows)
    results = {
        "settings": {
            "quick": settings.quick,
            "seeds_per_prompt": settings.seeds_per_prompt,
            "real_seeds_per_prompt": settings.real_seeds_per_prompt,
            "live_steps": settings.live_steps,
            "seed": settings.seed,
            "threads": torch.get_num_threads(),
            "models": [settings.teacher, settings.student]
            + ([settings.i2v_teacher, settings.i2v_student] if settings.i2v else []),
        },
        "held_out_prompts": sorted(set(prompts)),
        "rows": rows,
        "goals": check_goals(t_row, s_row),
        "i2v_rows": i2v_rows,
        "i2v_goals": i2v_goals,
        "live_history": history,
        "files": files,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(_finite(results), indent=2) + "\n")
    log("")
    log(format_table(rows))
    log("\nshipped models against the goals:")
    _log_goals(results["goals"], log)
    if i2v_rows:
        log("\nimage to video (held-out prompts, the given frame from a real clip):")
        log(format_i2v_table(i2v_rows))
        log("\nshipped image-to-video models against the goals:")
        _log_goals(i2v_goals, log)
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
