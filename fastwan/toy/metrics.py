"""Quality of generated toy clips, measured against the known truth.

* attribute accuracy: the probe's reading of each clip against the prompt's attributes;
* Frechet distance: between Gaussian fits of probe features of generated and of real
  clips of the same prompts (FID's formula, Heusel et al. 2017, Eq. 6, on the probe's
  features instead of Inception's);
* diversity: mean pairwise feature distance between clips of the same prompt across
  seeds, divided by the same for real clips (1: as varied as the world; 0: collapsed).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from fastwan.toy import world
from fastwan.toy.probe import ToyProbe

__all__ = ["attribute_accuracy", "diversity", "frechet_distance", "real_clips", "score_clips"]


def attribute_accuracy(
    probe: ToyProbe, clips: np.ndarray, combos: Sequence[world.Combo]
) -> dict[str, float]:
    """Fraction of clips whose attribute the probe reads as the prompt's, per attribute,
    and their mean (``"mean"``)."""
    if len(clips) != len(combos):
        raise ValueError(f"{len(clips)} clips but {len(combos)} combos; pass one per clip")
    pred = probe.predict(clips)  # [N, 4]
    truth = np.array([c.labels() for c in combos])  # [N, 4]
    acc = {
        name: float((pred[:, i] == truth[:, i]).mean()) for i, name in enumerate(world.ATTRIBUTES)
    }
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` of two feature
    sets ``[N, D]`` (each N >= 2)."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"features must be [N, D] with equal D, got {feats_a.shape}, {feats_b.shape}"
        )
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    feats_a, feats_b = (np.asarray(f, dtype=np.float64) for f in (feats_a, feats_b))
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    traces = float(np.trace(s_a) + np.trace(s_b))
    fd = mean_term + traces - 2 * float(np.trace(cross))
    # The distance is >= 0, but for (nearly) equal sets the traces cancel and leave float64
    # rounding of either sign (~1e-15 of the traces, eigh included): a negative that small
    # is 0. A clearly negative value (a bug, non-PSD input) is returned as it is.
    if -1e-9 * max(traces + mean_term, 1.0) < fd < 0:
        fd = 0.0
    return fd


def _spread(feats: np.ndarray, groups: Sequence[int]) -> float:
    """Mean pairwise distance within groups (clips of one prompt), averaged over groups."""
    # In float64 whatever the features' dtype: the distances and their means add no float32
    # rounding of their own (equal feature rows give exactly 0 in any dtype).
    feats, groups = np.asarray(feats, dtype=np.float64), np.asarray(groups)
    if len(groups) != len(feats):
        raise ValueError(f"{len(feats)} feature rows but {len(groups)} group indices")
    per_group = []
    for g in np.unique(groups):
        f = feats[groups == g]
        if len(f) < 2:
            continue
        d = [np.linalg.norm(f[i] - f[j]) for i, j in itertools.combinations(range(len(f)), 2)]
        per_group.append(float(np.mean(d)))
    if not per_group:
        raise ValueError("diversity needs at least one prompt with 2 or more seeds")
    return float(np.mean(per_group))


def diversity(
    feats: np.ndarray,
    real_feats: np.ndarray,
    groups: Sequence[int],
    real_groups: Sequence[int] | None = None,
) -> float:
    """Within-prompt feature spread of generated clips relative to real clips of the same
    prompts (``groups[i]``: the prompt index of clip ``i``; ``real_groups`` likewise for the
    real clips, default ``groups``)."""
    real_groups = groups if real_groups is None else real_groups
    return _spread(feats, groups) / _spread(real_feats, real_groups)


def real_clips(combos: Sequence[world.Combo], seed: int = 777) -> np.ndarray:
    """Rendered clips of ``combos`` with seeds from ``seed`` (the real reference set)."""
    rng = np.random.default_rng(seed)
    return world.render_batch(combos, rng.integers(0, 2**31, len(combos)))


def score_clips(
    probe: ToyProbe,
    clips: np.ndarray,
    combos: Sequence[world.Combo],
    groups: Sequence[int],
    real: np.ndarray,
    real_groups: Sequence[int],
) -> dict[str, float]:
    """Accuracy (per attribute and mean), Frechet distance and diversity of ``clips``
    (prompt ``combos``, prompt index ``groups``) against real clips of the same prompts
    (``real``, prompt index ``real_groups``)."""
    acc = attribute_accuracy(probe, clips, combos)
    feats, real_feats = probe.features_of(clips), probe.features_of(real)
    return {
        **{f"accuracy_{k}": v for k, v in acc.items()},
        "frechet": frechet_distance(feats, real_feats),
        "diversity": diversity(feats, real_feats, groups, real_groups),
    }
