"""The toy text-to-video world: procedural clips with known ground truth, and their prompts.

A clip is one object (a *shape* of a *colour*) moving in a *direction* over a plain
*background*, ``NUM_FRAMES`` frames of ``SIZE x SIZE`` RGB. Every attribute is known, so a
probe can score a generated clip against its prompt. Prompts come from a small grammar
("a red square moving left on a grey background", with a few synonyms); a fixed set of
attribute combinations (:data:`HELD_OUT`) never appears in training data and serves only
for evaluation.

Rendering is deterministic per seed (numpy's PCG64 through ``np.random.default_rng``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLORS",
    "DIRECTIONS",
    "HELD_OUT",
    "NUM_FRAMES",
    "SHAPES",
    "SIZE",
    "Combo",
    "all_combos",
    "canonical_prompt",
    "grammar_words",
    "parse_prompt",
    "random_prompt",
    "render_clip",
    "render_batch",
    "train_combos",
]

SIZE = 16  # pixels, square frames
NUM_FRAMES = 8
FPS = 8

SHAPES = ("square", "circle", "triangle")
COLORS = ("red", "green", "blue", "yellow")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS = ("black", "grey", "white")
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "direction": DIRECTIONS, "background": BACKGROUNDS}

_RGB = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.22),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
_BG = {"black": 0.05, "grey": 0.5, "white": 0.95}
_VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)

# Grammar: "<det> <color> <shape> <verb> <direction> <prep> <det> <background> background".
_DETS = ("a", "the")
_VERBS = ("moving", "moves", "going", "goes", "sliding", "slides")
_PREPS = ("on", "over", "across")
_SYNONYMS = {"gray": "grey"}


@dataclass(frozen=True)
class Combo:
    """One attribute combination (what a prompt asks for)."""

    shape: str
    color: str
    direction: str
    background: str

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}")

    def labels(self) -> tuple[int, int, int, int]:
        """Class index of each attribute, in :data:`ATTRIBUTES` order."""
        return tuple(values.index(getattr(self, name)) for name, values in ATTRIBUTES.items())


def all_combos() -> list[Combo]:
    return [Combo(*c) for c in itertools.product(SHAPES, COLORS, DIRECTIONS, BACKGROUNDS)]


def _held_out() -> frozenset[Combo]:
    # One combination in twelve, spread so that every attribute value and every pair of
    # values still occurs in training: the evaluation asks for new *combinations*.
    out = set()
    for c in all_combos():
        s, k, d, b = c.labels()
        if (s + 2 * k + 3 * d + 5 * b) % 12 == 1:
            out.add(c)
    return frozenset(out)


HELD_OUT: frozenset[Combo] = _held_out()


def train_combos() -> list[Combo]:
    return [c for c in all_combos() if c not in HELD_OUT]


def canonical_prompt(combo: Combo) -> str:
    return (
        f"a {combo.color} {combo.shape} moving {combo.direction} on a {combo.background} background"
    )


def random_prompt(combo: Combo, rng: np.random.Generator) -> str:
    """A prompt of the grammar for ``combo`` with random determiners, verb and preposition."""
    det1, det2 = (str(rng.choice(_DETS)) for _ in range(2))
    verb, prep = str(rng.choice(_VERBS)), str(rng.choice(_PREPS))
    bg = "gray" if combo.background == "grey" and rng.random() < 0.3 else combo.background
    return (
        f"{det1} {combo.color} {combo.shape} {verb} {combo.direction} {prep} {det2} {bg} background"
    )


def grammar_words() -> list[str]:
    """Every word a prompt of the grammar uses (the toy tokenizer's vocabulary)."""
    words = [*_DETS, *_VERBS, *_PREPS, "background", *_SYNONYMS]
    for values in ATTRIBUTES.values():
        words += list(values)
    return list(dict.fromkeys(words))


def parse_prompt(prompt: str) -> Combo:
    """The attributes a free-text prompt of the grammar asks for (word order free; each
    attribute must be named exactly once)."""
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", prompt.lower())]
    found = {}
    for name, values in ATTRIBUTES.items():
        hits = [w for w in words if w in values]
        if len(set(hits)) != 1:
            raise ValueError(
                f"prompt {prompt!r} must name exactly one {name} from {values} (found {hits}); "
                f"e.g. {canonical_prompt(all_combos()[0])!r}"
            )
        found[name] = hits[0]
    return Combo(**found)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= (1.1 * r) ** 2
    # An upward triangle: apex at the top, base at the bottom, same height as the square.
    h = 2.2 * r
    y = dy + 0.55 * h  # 0 at the apex, h at the base
    return (y >= 0) & (y <= h) & (np.abs(dx) <= y * (1.1 * r) / h)


_SUPER = 4  # supersampling per axis, for smooth sub-pixel motion


def render_clip(
    combo: Combo,
    seed: int,
    spread: float = 1.0,
    start: tuple[float, float] | None = None,
) -> np.ndarray:
    """One clip ``[NUM_FRAMES, SIZE, SIZE, 3]`` float32 in [0, 1]; the object's size,
    speed, start and colour/brightness jitter are drawn from ``seed``. ``spread`` scales
    the ranges of size, speed and start around their centres (1: the world's; the probe
    trains on wider ones so that it reads imperfect generated clips fairly). ``start``:
    the object's centre ``(x, y)`` in pixels at frame 0 instead of the drawn one (the
    image-to-video world places it independently of the motion, :mod:`fastwan.toy.i2v`);
    the other draws are the same either way."""
    if not spread > 0:
        raise ValueError(f"spread must be > 0 (1 = the world's ranges), got {spread!r}")
    rng = np.random.default_rng(seed)

    def draw(centre: float, half: float) -> float:
        return centre + spread * rng.uniform(-half, half)

    # Narrow ranges: every seed differs (size, speed, place, tint), but a clip is nearly
    # determined by its prompt, so a tiny model learns it in minutes on a CPU (with wide
    # ranges it must break symmetry between places, which it learns far more slowly).
    r = draw(3.8, 0.2)  # half-size in pixels: a quarter of the frame, shapes read clearly
    speed = draw(0.8, 0.06)  # pixels per frame
    vx, vy = _VELOCITY[combo.direction]
    travel = speed * (NUM_FRAMES - 1)
    margin = 1.2 * r + 0.5

    def start_at(v: int) -> float:
        # Objects start on the side they move away from, centred on the other axis, with
        # half a pixel of jitter.
        centre = SIZE / 2 - v * travel / 2
        return float(np.clip(draw(centre, 0.5), margin, SIZE - margin))

    x0, y0 = start_at(vx), start_at(vy)  # drawn even when given: the same later draws
    if start is not None:
        x0, y0 = float(start[0]), float(start[1])
    color = np.clip(np.array(_RGB[combo.color]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    bg = np.clip(_BG[combo.background] + rng.uniform(-0.04, 0.04), 0, 1)

    n = SIZE * _SUPER
    coords = (np.arange(n) + 0.5) / _SUPER  # pixel-space sample positions
    xs, ys = np.meshgrid(coords, coords)  # [n, n]
    frames = np.empty((NUM_FRAMES, SIZE, SIZE, 3), np.float32)
    for f in range(NUM_FRAMES):
        cx, cy = x0 + vx * speed * f, y0 + vy * speed * f
        mask = _shape_mask(combo.shape, xs - cx, ys - cy, r).astype(np.float32)
        cover = mask.reshape(SIZE, _SUPER, SIZE, _SUPER).mean(axis=(1, 3))  # [S, S]
        frames[f] = bg + cover[..., None] * (color - bg)
    return frames


def render_batch(combos: Sequence[Combo], seeds: Sequence[int], spread: float = 1.0) -> np.ndarray:
    """Clips ``[N, NUM_FRAMES, SIZE, SIZE, 3]`` float32 in [0, 1] (``spread``: see
    :func:`render_clip`)."""
    if len(combos) != len(seeds):
        raise ValueError(f"{len(combos)} combos but {len(seeds)} seeds; pass one seed per combo")
    return np.stack([render_clip(c, int(s), spread) for c, s in zip(combos, seeds)])
