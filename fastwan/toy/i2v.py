"""The toy world's image-to-video side: clips whose first frame is given, and the measures
that say whether a model kept that frame and moved the object as the prompt says.

The world (:func:`render_i2v_clip`): the text-to-video world's clips
(:func:`fastwan.toy.world.render_clip`), except that the object starts anywhere in a box
around the frame's centre, drawn independently of its direction, so that the first frame
-- shape, colour, position, background -- says nothing about the motion and only the prompt
does (in the text-to-video world an object starts on the side it moves away from). It may
leave the frame in part by the last frame. Held-out combinations are the text-to-video
world's (:data:`fastwan.toy.world.HELD_OUT`): appearance and motion pairings never trained.

The measures read the object off the pixels (the renderer is known: a flat background and
one flat-coloured object), so they need no trained model and are exact on real clips:

* first-frame fidelity: PSNR of each clip's first frame to the given frame, and whether
  its attributes match the given frame's (:func:`first_frame_match`: the object's colour
  and the background name the same world colours, and the object masks overlap with
  IoU >= 0.7, which covers shape, size and position);
* motion: the object's centroid per frame (:func:`centroids`); its net displacement gives
  the direction (:func:`motion_direction`), its mean step the magnitude in pixels per frame
  (:func:`motion_magnitude`), compared with real clips of the same items: a model that
  collapses to static frames (the failure FastVideo users report for DMD on Wan2.1-I2V)
  scores a magnitude ratio near 0.

:func:`score_i2v` puts them together (with the probe's Frechet distance and diversity when
a probe is given); :func:`check_i2v_goals` checks a teacher row and a student row against
:data:`I2V_GOALS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fastwan.toy import world

__all__ = [
    "I2V_GOALS",
    "START_BOX",
    "centroids",
    "check_i2v_goals",
    "first_frame_match",
    "first_frame_psnr",
    "i2v_start",
    "motion_direction",
    "motion_magnitude",
    "render_i2v_batch",
    "render_i2v_clip",
    "score_i2v",
]

# The object's frame-0 centre is drawn uniformly from this box (pixels, both axes), for
# every direction alike.
START_BOX = (5.0, 11.0)
# A pixel belongs to the object when some channel differs from the background by more.
_OBJECT_THRESHOLD = 0.15
_IOU_MATCH = 0.7
_PSNR_CAP = 100.0  # dB reported for identical frames

# The image-to-video bars (issue 18), on the shipped I2V teacher and student.
I2V_GOALS = {
    "student_direction_ratio": 0.95,  # student direction accuracy / teacher's, at least
    "student_first_frame": 0.98,  # fraction of student clips keeping the given frame's attributes
    "student_motion_error": 0.2,  # |student magnitude / real clips' - 1|, at most
    "student_speedup": 15.0,  # teacher seconds per clip / student's, at least
}
_CEILINGS = {"student_motion_error"}


def i2v_start(seed: int) -> tuple[float, float]:
    """The object's centre ``(x, y)`` at frame 0 of the image-to-video clip of ``seed``:
    uniform in :data:`START_BOX`, from a stream of its own (independent of the direction
    and of the clip's other draws)."""
    rng = np.random.default_rng([int(seed), 18])
    lo, hi = START_BOX
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def render_i2v_clip(combo: world.Combo, seed: int) -> np.ndarray:
    """One image-to-video clip ``[NUM_FRAMES, SIZE, SIZE, 3]`` float32 in [0, 1]: the
    text-to-video clip of ``(combo, seed)`` started at :func:`i2v_start` ``(seed)``. Its
    first frame is the conditioning image."""
    return world.render_clip(combo, seed, start=i2v_start(seed))


def render_i2v_batch(combos: Sequence[world.Combo], seeds: Sequence[int]) -> np.ndarray:
    """Clips ``[N, NUM_FRAMES, SIZE, SIZE, 3]`` (:func:`render_i2v_clip`)."""
    if len(combos) != len(seeds):
        raise ValueError(f"{len(combos)} combos but {len(seeds)} seeds; pass one seed per combo")
    return np.stack([render_i2v_clip(c, int(s)) for c, s in zip(combos, seeds)])


def _as_clips(clips: np.ndarray, name: str = "clips") -> np.ndarray:
    clips = np.asarray(clips, dtype=np.float64)
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"{name} must be [N, T, H, W, 3] in [0, 1], got shape {clips.shape}")
    return clips


def _background(frames: np.ndarray) -> np.ndarray:
    """Per-frame background colour ``[..., 3]`` of frames ``[..., H, W, 3]``: the median
    pixel (the object covers well under half of a frame)."""
    flat = frames.reshape(*frames.shape[:-3], -1, 3)
    return np.median(flat, axis=-2)


def _object_weight(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """How much each pixel of ``[..., H, W, 3]`` is object: ``max_c |pixel - bg|`` where it
    exceeds the threshold, else 0; ``[..., H, W]``."""
    diff = np.abs(frames - background[..., None, None, :]).max(axis=-1)
    return np.where(diff > _OBJECT_THRESHOLD, diff, 0.0)


def centroids(clips: np.ndarray) -> np.ndarray:
    """The object's centroid ``(x, y)`` in pixels per frame, ``[N, T, 2]`` (NaN in a frame
    without object pixels); the background is read off the first frame."""
    clips = _as_clips(clips)
    bg = _background(clips[:, :1])  # [N, 1, 3]: the given frame's background
    w = _object_weight(clips, np.broadcast_to(bg, clips.shape[:2] + (3,)))  # [N, T, H, W]
    h, wd = clips.shape[2:4]
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(wd) + 0.5, indexing="ij")
    total = w.sum(axis=(-2, -1))  # [N, T]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (w * xs).sum(axis=(-2, -1)) / total
        cy = (w * ys).sum(axis=(-2, -1)) / total
    out = np.stack([cx, cy], axis=-1)
    out[total <= 0] = np.nan
    return out


def _displacement(clips: np.ndarray) -> np.ndarray:
    """Net centroid displacement ``[N, 2]`` from the first frame to the last frame that
    has the object (0 when there is none)."""
    c = centroids(clips)  # [N, T, 2]
    out = np.zeros((c.shape[0], 2))
    for i, track in enumerate(c):
        valid = np.flatnonzero(np.isfinite(track[:, 0]))
        if len(valid) >= 2:
            out[i] = track[valid[-1]] - track[valid[0]]
    return out


def motion_direction(clips: np.ndarray) -> np.ndarray:
    """Index into :data:`fastwan.toy.world.DIRECTIONS` of each clip's net motion ``[N]``
    (the axis and sign of the larger displacement component; image rows grow downwards)."""
    d = _displacement(clips)  # [N, 2] (dx, dy)
    scores = np.stack([-d[:, 0], d[:, 0], -d[:, 1], d[:, 1]], axis=1)  # left right up down
    return scores.argmax(axis=1)


def motion_magnitude(clips: np.ndarray) -> np.ndarray:
    """Mean centroid step per frame in pixels ``[N]`` over consecutive frames that both
    have the object (0 for a clip that never moves or has no object)."""
    c = centroids(clips)  # [N, T, 2]
    steps = np.linalg.norm(np.diff(c, axis=1), axis=-1)  # [N, T - 1], NaN where missing
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(np.where(np.isfinite(steps), steps, np.nan), axis=1)
    return np.nan_to_num(mean, nan=0.0)


def first_frame_psnr(clips: np.ndarray, given: np.ndarray) -> np.ndarray:
    """PSNR (dB, peak 1) of each clip's first frame to its given frame ``[N, H, W, 3]``;
    ``[N]``, capped at 100 dB for identical frames."""
    clips = _as_clips(clips)
    given = np.asarray(given, dtype=np.float64)
    if given.shape != clips.shape[:1] + clips.shape[2:]:
        raise ValueError(
            f"given must be the first frames [N, H, W, 3] = {clips.shape[:1] + clips.shape[2:]}"
            f", got {given.shape}"
        )
    mse = ((clips[:, 0] - given) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        psnr = -10.0 * np.log10(mse)
    return np.minimum(psnr, _PSNR_CAP)


def _nearest(values: np.ndarray, table: Mapping[str, Sequence[float] | float]) -> np.ndarray:
    names = list(table)
    ref = np.array([np.broadcast_to(np.asarray(table[n], float), (3,)) for n in names])
    dist = ((values[:, None, :] - ref[None]) ** 2).sum(-1)  # [N, K]
    return dist.argmin(axis=1)


def first_frame_match(clips: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Whether each clip's first frame keeps the given frame's attributes ``[N]`` bool:
    the same world colour of the object and of the background (nearest named colour), and
    object masks with IoU >= 0.7 (shape, size and position)."""
    clips = _as_clips(clips)
    given = np.asarray(given, dtype=np.float64)
    first_frame_psnr(clips, given)  # checks the shapes
    frames = np.stack([clips[:, 0], given], axis=1)  # [N, 2, H, W, 3]
    bg = _background(frames)  # [N, 2, 3]
    w = _object_weight(frames, bg)  # [N, 2, H, W]
    masks = w > 0
    inter = (masks[:, 0] & masks[:, 1]).sum(axis=(1, 2))
    union = (masks[:, 0] | masks[:, 1]).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    # the object's colour: the mean of its most object-like pixels (edges are blended)
    colours = np.zeros(bg.shape)
    for i in range(frames.shape[0]):
        for j in range(2):
            strong = w[i, j] >= 0.8 * w[i, j].max() if masks[i, j].any() else None
            if strong is not None:
                colours[i, j] = frames[i, j][strong].mean(axis=0)
    rgb = dict(world._RGB)
    same_colour = _nearest(colours[:, 0], rgb) == _nearest(colours[:, 1], rgb)
    same_bg = _nearest(bg[:, 0], world._BG) == _nearest(bg[:, 1], world._BG)
    return same_colour & same_bg & (iou >= _IOU_MATCH)


def score_i2v(
    clips: np.ndarray,
    combos: Sequence[world.Combo],
    given: np.ndarray,
    real: np.ndarray,
    *,
    probe=None,
    groups: Sequence[int] | None = None,
    real_groups: Sequence[int] | None = None,
) -> dict[str, float]:
    """The image-to-video scores of generated ``clips`` ``[N, T, H, W, 3]`` of items
    (prompt ``combos``, given first frames ``given`` ``[N, H, W, 3]``) against ``real``
    clips of the same items: ``first_frame_psnr`` (mean dB), ``first_frame_attributes``
    (fraction matching), ``direction_accuracy`` (fraction moving as the prompt says),
    ``motion_magnitude`` (pixels per frame) and ``motion_ratio`` (over the real clips');
    with a ``probe`` (:class:`fastwan.toy.probe.ToyProbe`) also ``frechet`` and, with
    ``groups`` / ``real_groups`` (item index per clip), ``diversity``."""
    from fastwan.toy.metrics import diversity, frechet_distance

    clips, real = _as_clips(clips), _as_clips(real, "real")
    if len(combos) != len(clips):
        raise ValueError(f"{len(clips)} clips but {len(combos)} combos; pass one per clip")
    want = np.array([world.DIRECTIONS.index(c.direction) for c in combos])
    magnitude = float(motion_magnitude(clips).mean())
    real_magnitude = float(motion_magnitude(real).mean())
    if real_magnitude <= 0:
        raise ValueError("the real clips do not move: pass rendered clips of the same items")
    out = {
        "first_frame_psnr": float(first_frame_psnr(clips, given).mean()),
        "first_frame_attributes": float(first_frame_match(clips, given).mean()),
        "direction_accuracy": float((motion_direction(clips) == want).mean()),
        "motion_magnitude": magnitude,
        "motion_ratio": magnitude / real_magnitude,
    }
    if probe is not None:
        feats, real_feats = probe.features_of(clips), probe.features_of(real)
        out["frechet"] = frechet_distance(feats, real_feats)
        if groups is not None and real_groups is not None:
            out["diversity"] = diversity(feats, real_feats, groups, real_groups)
    return out


def check_i2v_goals(teacher: Mapping[str, float], student: Mapping[str, float]) -> list[dict]:
    """Each bar of :data:`I2V_GOALS` for a teacher row and a student row (the
    :func:`score_i2v` keys plus ``sec_per_clip``): ``{"goal", "value", "cmp", "target",
    "met"}``."""
    for row, name in ((teacher, "teacher"), (student, "student")):
        missing = {"direction_accuracy", "sec_per_clip"} - set(row)
        if missing:
            raise ValueError(f"the {name} row lacks {sorted(missing)}")
    missing = {"first_frame_attributes", "motion_ratio"} - set(student)
    if missing:
        raise ValueError(f"the student row lacks {sorted(missing)}")
    values = {
        "student_direction_ratio": student["direction_accuracy"]
        / max(teacher["direction_accuracy"], 1e-9),
        "student_first_frame": student["first_frame_attributes"],
        "student_motion_error": abs(student["motion_ratio"] - 1.0),
        "student_speedup": teacher["sec_per_clip"] / max(student["sec_per_clip"], 1e-12),
    }
    out = []
    for goal, target in I2V_GOALS.items():
        ceiling = goal in _CEILINGS
        value = float(values[goal])
        met = value <= target if ceiling else value >= target
        out.append(
            {
                "goal": goal,
                "value": value,
                "cmp": "<=" if ceiling else ">=",
                "target": target,
                "met": bool(met),
            }  # fmt: skip
        )
    return out
