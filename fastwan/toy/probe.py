"""A probe that knows the toy world's truth: a small 3-D CNN trained on rendered clips to
read every attribute (shape, colour, direction, background) back out of a clip.

It scores generated clips against their prompts (:mod:`fastwan.toy.metrics`), and its
penultimate features give the Frechet distance and diversity. It is trained on clips of
*all* combinations (it is the judge, not a generator) with fresh seeds, with noise and blur
augmentation so that imperfect generated clips are read fairly.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastwan.toy import world

__all__ = ["ToyProbe", "load_probe", "train_probe", "PROBE_FILE"]

PROBE_FILE = Path(__file__).parent / "weights" / "probe.safetensors"
FEATURE_DIM = 128


class ToyProbe(nn.Module):
    """Clips ``[B, T, H, W, 3]`` in [0, 1] -> per-attribute logits (and features)."""

    def __init__(self) -> None:
        super().__init__()
        # Strided convolutions, no pooling: cheap enough to train on a laptop CPU.
        self.body = nn.Sequential(
            nn.Conv3d(3, 16, (3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.ReLU(),  # [16, T, S/2, S/2]
            nn.Conv3d(16, 32, (3, 4, 4), stride=2, padding=1),
            nn.ReLU(),  # [32, T/2, S/4, S/4]
            nn.Conv3d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),  # [64, T/4, S/8, S/8]
        )
        # Per-frame 2-D convolutions with a global max: translation-invariant shape cues.
        self.frames = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),  # [32, S/2, S/2]
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),  # [32, S/4, S/4]
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        flat = 64 * (world.NUM_FRAMES // 4) * (world.SIZE // 8) ** 2 + 32
        self.features = nn.Sequential(nn.Linear(flat, FEATURE_DIM), nn.ReLU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(FEATURE_DIM, len(values)) for name, values in world.ATTRIBUTES.items()}
        )

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, W, 3]`` -> features ``[B, FEATURE_DIM]``."""
        expected = (world.NUM_FRAMES, world.SIZE, world.SIZE, 3)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(
                f"clips must be [B, {', '.join(map(str, expected))}], got {tuple(clips.shape)}"
            )
        b, t = clips.shape[:2]
        x = clips.permute(0, 4, 1, 2, 3) * 2 - 1  # [B, 3, T, H, W] in [-1, 1]
        motion = self.body(x).flatten(1)  # [B, 64 T/4 H/8 W/8]
        per_frame = self.frames(x.transpose(1, 2).reshape(b * t, 3, world.SIZE, world.SIZE))
        shape = per_frame.reshape(b, t, -1).mean(dim=1)  # [B, 32]
        return self.features(torch.cat([motion, shape], dim=1))

    def forward(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.embed(clips)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, clips: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Predicted class per attribute ``[N, 4]`` (ATTRIBUTES order)."""
        out = []
        for chunk in _chunks(clips, batch_size):
            logits = self(chunk)
            out.append(torch.stack([logits[n].argmax(-1) for n in world.ATTRIBUTES], dim=1))
        return torch.cat(out).numpy()

    @torch.no_grad()
    def features_of(self, clips: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Features ``[N, FEATURE_DIM]`` (float64) of clips."""
        return torch.cat([self.embed(c) for c in _chunks(clips, batch_size)]).double().numpy()


def _chunks(clips, batch_size: int):
    clips = torch.as_tensor(np.asarray(clips, dtype=np.float32))
    for start in range(0, len(clips), batch_size):
        yield clips[start : start + batch_size]


def load_probe(path: str | Path | None = None) -> ToyProbe:
    """The shipped probe (or one saved at ``path``), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else PROBE_FILE
    if not path.is_file():
        raise ValueError(
            f"no probe weights at {path}; train them with `fastwan toy probe --out {path}`"
        )
    probe = ToyProbe()
    probe.load_state_dict(load_file(str(path)))
    return probe.eval()


def _augment(clips: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random blur and noise, per clip: generated clips are rarely as crisp as renders."""
    b = clips.shape[0]
    x = clips.permute(0, 1, 4, 2, 3).reshape(-1, 3, world.SIZE, world.SIZE)  # [B T, 3, H, W]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, generator=rng).repeat_interleave(world.NUM_FRAMES)[:, None, None, None]
    x = x + mix * (blurred - x)
    x = x.reshape(b, world.NUM_FRAMES, 3, world.SIZE, world.SIZE).permute(0, 1, 3, 4, 2)
    sigma = 0.08 * torch.rand(b, 1, 1, 1, 1, generator=rng)
    return (x + sigma * torch.randn(x.shape, generator=rng)).clamp(0, 1)


# The probe trains on twice the world's ranges of size, speed and place: generated clips
# stray further than real ones, and the judge must read them fairly.
TRAIN_SPREAD = 2.0


def _batch(rng: np.random.Generator, n: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    combos = world.all_combos()
    picks = [combos[i] for i in rng.integers(0, len(combos), n)]
    clips = world.render_batch(picks, rng.integers(0, 2**31, n), spread=spread)
    return clips, np.array([c.labels() for c in picks])


def evaluate_probe(probe: ToyProbe, num_clips: int = 1024, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on fresh rendered clips of every combination (held-out
    combinations included), ``num_clips // 144`` seeds each plus a random remainder."""
    rng = np.random.default_rng(seed)
    clips, labels = _batch(rng, num_clips)
    pred = probe.predict(clips)
    return {
        name: float((pred[:, i] == labels[:, i]).mean()) for i, name in enumerate(world.ATTRIBUTES)
    }


def train_probe(
    out: str | Path,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train a probe on freshly rendered clips, save it to ``out`` (safetensors) and return
    its per-attribute accuracy on held-out renders (other seeds)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)  # the initial weights; the data comes from rng below
    probe = ToyProbe()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="probe", unit="step", disable=not progress, file=sys.stderr)
    for _ in bar:
        clips, labels = _batch(rng, batch_size, spread=TRAIN_SPREAD)
        x = _augment(torch.from_numpy(clips), gen)
        y = torch.from_numpy(labels)
        logits = probe(x)
        loss = sum(F.cross_entropy(logits[n], y[:, i]) for i, n in enumerate(world.ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    probe.eval()
    accuracy = evaluate_probe(probe)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {f"accuracy_{k}": f"{v:.4f}" for k, v in accuracy.items()}
    meta.update(steps=str(steps), seed=str(seed), seconds=f"{time.perf_counter() - start:.0f}")
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(out), metadata=meta)
    return accuracy
