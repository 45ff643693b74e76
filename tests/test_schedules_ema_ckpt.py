"""LR / sparsity schedules, EMA, atomic checkpoint directories and RNG state."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastwan.config import OptimConfig, VSAConfig
from fastwan.methods.schedules import (
    constant_multiplier,
    cosine_multiplier,
    lr_lambda,
    make_lr_scheduler,
    vsa_sparsity_at,
    vsa_sparsity_from_config,
    warmup_multiplier,
)
from fastwan.train.checkpoint_io import (
    CHECKSUMS_FILE,
    COMPLETE_MARKER,
    capture_rng_state,
    checkpoint_dir,
    commit_checkpoint_dir,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    prepare_checkpoint_dir,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from fastwan.train.ema import EMA

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- schedules


def test_lr_multipliers_at_known_steps():
    assert [constant_multiplier(s) for s in (0, 5, 10**6)] == [1.0, 1.0, 1.0]
    assert [warmup_multiplier(s, 4) for s in (0, 1, 2, 3, 4, 100)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
    ]
    assert warmup_multiplier(0, 0) == 1.0
    # warmup 10, total 110, floor 0.5: 1 at step 10, midpoint 0.75 at 60, 0.5 from 110 on.
    c = lambda s: cosine_multiplier(s, 10, 110, 0.5)
    assert c(0) == pytest.approx(0.1) and c(9) == pytest.approx(1.0)
    assert c(10) == pytest.approx(1.0)
    assert c(35) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert c(60) == pytest.approx(0.75)
    assert c(110) == pytest.approx(0.5) and c(500) == pytest.approx(0.5)
    # No warmup, floor 0: plain half cosine from 1 to 0.
    assert cosine_multiplier(0, 0, 100) == 1.0
    assert cosine_multiplier(50, 0, 100) == pytest.approx(0.5)
    assert cosine_multiplier(100, 0, 100) == pytest.approx(0.0, abs=1e-12)
    # Monotone non-increasing after warmup.
    vals = [c(s) for s in range(10, 120)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_lambda_lr_applies_the_schedule_per_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    cfg = OptimConfig(lr=2.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.5)
    sched = make_lr_scheduler(opt, cfg, total_steps=6)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * cosine_multiplier(s, 2, 6, 0.5) for s in range(8)]
    assert lrs == pytest.approx(expected)
    assert lrs[:3] == pytest.approx([1.0, 2.0, 2.0]) and lrs[-1] == pytest.approx(1.0)


def test_lr_lambda_per_schedule_and_errors():
    assert lr_lambda(OptimConfig(), 10)(7) == 1.0
    f = lr_lambda(OptimConfig(schedule="warmup", warmup_steps=5), 10)
    assert f(0) == pytest.approx(0.2) and f(4) == 1.0
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        lr_lambda(OptimConfig(), 0)
    with pytest.raises(ValueError, match="warmup_steps .* must be <= total_steps"):
        lr_lambda(OptimConfig(schedule="cosine", warmup_steps=50), 10)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        warmup_multiplier(-1, 3)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        cosine_multiplier(0, 0, 10, 1.5)


def test_vsa_sparsity_schedule():
    # 0.03 every 30 steps up to 0.9 (a FastVideo VSA fine-tuning setting).
    assert vsa_sparsity_at(0, 0.9, 0.03, 30) == 0.0
    assert vsa_sparsity_at(29, 0.9, 0.03, 30) == 0.0
    assert vsa_sparsity_at(30, 0.9, 0.03, 30) == pytest.approx(0.03)
    assert vsa_sparsity_at(449, 0.9, 0.03, 30) == pytest.approx(0.42)
    assert vsa_sparsity_at(899, 0.9, 0.03, 30) == pytest.approx(0.87)
    assert vsa_sparsity_at(900, 0.9, 0.03, 30) == 0.9  # exactly the target, not 0.8999...
    assert vsa_sparsity_at(10**6, 0.9, 0.03, 30) == 0.9
    # A rate that overshoots is capped; rate 0 means "no ramp".
    assert vsa_sparsity_at(1, 0.8, 0.5, 1) == 0.5 and vsa_sparsity_at(2, 0.8, 0.5, 1) == 0.8
    assert vsa_sparsity_at(0, 0.8) == 0.8
    vals = [vsa_sparsity_at(s, 0.9, 0.1, 7) for s in range(100)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert vsa_sparsity_from_config(0, VSAConfig(sparsity=0.8)) == 0.8
    assert vsa_sparsity_from_config(
        5, VSAConfig(sparsity=0.8, decay_rate=0.2, decay_interval=2)
    ) == pytest.approx(0.4)
    assert vsa_sparsity_from_config(100, VSAConfig(enabled=False)) == 0.0
    with pytest.raises(ValueError, match="decay_interval must be a positive int"):
        vsa_sparsity_at(0, 0.9, 0.1, 0)
    with pytest.raises(ValueError, match=r"target sparsity must be in \[0, 1\)"):
        vsa_sparsity_at(0, 1.0)


# ---------------------------------------------------------------------------------- EMA


class _Net(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
        self.frozen = torch.nn.Parameter(torch.ones(2, dtype=dtype), requires_grad=False)


def test_ema_math_on_a_known_sequence():
    net = _Net(torch.float64)
    ema = EMA(net, decay=0.9)
    values = [1.0, 2.0, 4.0, -1.0, 0.5]
    for v in values:
        with torch.no_grad():
            net.w.fill_(v)
        ema.update(net)
    # shadow_n = d^n * p0 + (1 - d) * sum_k d^(n-k) p_k, with p0 = 0.
    d = 0.9
    closed = sum((1 - d) * d ** (len(values) - 1 - i) * v for i, v in enumerate(values))
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), closed, dtype=torch.float64))
    assert closed == pytest.approx(0.9**4 * 0.1 + 0.9**3 * 0.2 + 0.9**2 * 0.4 - 0.09 + 0.05)
    assert ema.num_updates == 5
    assert "frozen" not in ema.shadow  # frozen parameters are not averaged
    # A per-call decay overrides: decay 0 copies the weights.
    ema.update(net, decay=0.0)
    torch.testing.assert_close(ema.shadow["w"], net.w.detach())


def test_ema_bf16_weights_average_in_float32():
    net = _Net(torch.bfloat16)
    ema = EMA(net, decay=0.999)
    assert ema.shadow["w"].dtype == torch.float32
    with torch.no_grad():
        net.w.fill_(1.0)
    for _ in range(10):
        ema.update(net)
    expected = 1 - 0.999**10  # ~0.00995: bf16 accumulation would stall at a coarser value
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), expected), rtol=1e-5, atol=0)


def test_ema_swap_context_restores_live_weights_even_on_error():
    net = _Net()
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.w.fill_(4.0)
    ema.update(net)  # shadow = 2
    with ema.swapped_in(net) as m:
        assert m is net
        torch.testing.assert_close(net.w.detach(), torch.full((3,), 2.0))
    torch.testing.assert_close(net.w.detach(), torch.full((3,), 4.0))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_in(net):
            raise RuntimeError("boom")
    torch.testing.assert_close(net.w.detach(), torch.full((3,), 4.0))
    ema.copy_to(net)
    torch.testing.assert_close(net.w.detach(), torch.full((3,), 2.0))
    ema.reset(net)
    assert ema.num_updates == 0


def test_ema_state_dict_round_trip_and_mismatch(tmp_path):
    net = _Net()
    ema = EMA(net, decay=0.99)
    with torch.no_grad():
        net.w.fill_(3.0)
    ema.update(net)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    other = EMA(_Net(), decay=0.5)
    other.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    torch.testing.assert_close(other.shadow["w"], ema.shadow["w"])
    assert other.decay == 0.99 and other.num_updates == 1
    bad = ema.state_dict()
    bad["shadow"]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(net, decay=1.0)
    with pytest.raises(ValueError, match="lacks"):
        ema.update(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- checkpoints


def _write(files: dict[str, str]):
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)

    return write


def test_save_and_find_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    p100 = save_checkpoint(checkpoint_dir(tmp_path, 100), _write({"a.txt": "100"}), {"step": 100})
    p20 = save_checkpoint(checkpoint_dir(tmp_path, 20), _write({"sub/b.txt": "20"}))
    assert p100.name == "checkpoint-100" and is_complete(p100) and is_complete(p20)
    assert (p20 / "sub" / "b.txt").read_text() == "20"
    # Newest by step number, not by name order or mtime.
    assert latest_checkpoint(tmp_path) == p100
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 100]
    assert '"step": 100' in (p100 / COMPLETE_MARKER).read_text()
    # Re-saving a step replaces it whole.
    save_checkpoint(p100, _write({"c.txt": "new"}))
    assert sorted(x.name for x in p100.iterdir()) == [COMPLETE_MARKER, "c.txt", CHECKSUMS_FILE]
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_interrupted_save_leaves_nothing_latest_checkpoint_returns(tmp_path):
    good = save_checkpoint(checkpoint_dir(tmp_path, 100), _write({"model.pt": "ok"}))

    def crash_mid_write(tmp: Path) -> None:
        (tmp / "model.pt").write_text("half a tens")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(checkpoint_dir(tmp_path, 200), crash_mid_write)
    assert latest_checkpoint(tmp_path) == good
    assert not checkpoint_dir(tmp_path, 200).exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["checkpoint-100"]
    # A crash while re-saving an existing step keeps the old one.
    with pytest.raises(OSError):
        save_checkpoint(good, crash_mid_write)
    assert (good / "model.pt").read_text() == "ok" and latest_checkpoint(tmp_path) == good


def test_hard_crash_mid_save_is_ignored_and_cleaned(tmp_path):
    """A process killed mid-write (no cleanup runs) leaves only an ignorable leftover."""
    good = save_checkpoint(checkpoint_dir(tmp_path, 100), _write({"model.pt": "ok"}))
    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from fastwan.train.checkpoint_io import checkpoint_dir, save_checkpoint

        def write(tmp):
            (tmp / "model.pt").write_text("partial")
            os._exit(3)  # killed: no exception handling, no cleanup

        save_checkpoint(checkpoint_dir({str(tmp_path)!r}, 200), write)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert proc.returncode == 3
    leftovers = [x.name for x in tmp_path.iterdir() if x.name != "checkpoint-100"]
    assert leftovers == [".checkpoint-200.incomplete"]
    # A directory that looks final but lacks the marker (e.g. copied by hand) is ignored too.
    (tmp_path / "checkpoint-300").mkdir()
    (tmp_path / "checkpoint-300" / "model.pt").write_text("?")
    assert latest_checkpoint(tmp_path) == good
    # The next save of step 200 starts from a clean temporary directory.
    p200 = save_checkpoint(checkpoint_dir(tmp_path, 200), _write({"x": "1"}))
    assert sorted(x.name for x in p200.iterdir()) == [COMPLETE_MARKER, CHECKSUMS_FILE, "x"]
    assert latest_checkpoint(tmp_path) == p200


def test_two_phase_commit_and_prune(tmp_path):
    for step in (1, 2, 3, 4):
        tmp = prepare_checkpoint_dir(checkpoint_dir(tmp_path, step))
        assert tmp.name.startswith(".") and not is_complete(tmp)
        (tmp / "shard0").write_text(str(step))  # e.g. every rank writes its shard
        assert latest_checkpoint(tmp_path) in (None, checkpoint_dir(tmp_path, step - 1))
        commit_checkpoint_dir(tmp, checkpoint_dir(tmp_path, step), {"step": step})
    prepare_checkpoint_dir(checkpoint_dir(tmp_path, 5))  # a crashed save's leftover
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [
        ".checkpoint-5.incomplete",
        "checkpoint-1",
        "checkpoint-2",
    ]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    with pytest.raises(ValueError, match="keep must be a positive int"):
        prune_checkpoints(tmp_path, keep=0)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        checkpoint_dir(tmp_path, -1)


# ---------------------------------------------------------------------------------- RNG


def _draws(gen: torch.Generator) -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        torch.rand(3).tolist(),
        torch.rand(3, generator=gen).tolist(),
        random.gauss(0, 1),
        float(np.random.randn()),
    )


def test_rng_restore_reproduces_draws(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in Python's state
    np.random.randn()
    state = capture_rng_state({"data": gen})
    torch.save(state, tmp_path / "rng.pt")  # plain data: weights_only loads it
    first = _draws(gen)
    restore_rng_state(state, {"data": gen})
    assert _draws(gen) == first
    _draws(gen)  # move everything on, then restore from the file
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), {"data": gen})
    assert _draws(gen) == first
    with pytest.raises(ValueError, match="no generator 'noise'"):
        restore_rng_state(state, {"noise": torch.Generator()})
    with pytest.raises(ValueError, match="lacks 'numpy'"):
        restore_rng_state({"python": None, "torch": None, "generators": {}})
