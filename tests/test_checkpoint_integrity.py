"""Checkpoint integrity (issue 15 items 6 and 7): checksums, fallback past a damaged
checkpoint, clear disk-full / read-only errors, and kill -9 during a save.

Tests run as root (permission bits do not stop it), so a full or read-only disk is
simulated: writers that fail with ENOSPC / EROFS, PyTorch's real error from writing into
``/dev/full``, and a faked ``os.statvfs`` saying the disk has no space left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from fastwan.fsutil import WriteError
from fastwan.train import checkpoint_io
from fastwan.train.checkpoint_io import (
    CHECKSUMS_FILE,
    COMPLETE_MARKER,
    checkpoint_dir,
    ensure_valid_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def _write(files: dict[str, bytes]):
    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)

    return write


def _save(root: Path, step: int, **files: bytes) -> Path:
    files = files or {"model.pt": os.urandom(4096), "sub/rng_rank0.pt": os.urandom(100)}
    return save_checkpoint(checkpoint_dir(root, step), _write(files), {"step": step})


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _full_disk(monkeypatch) -> None:
    """``os.statvfs`` reports a disk with no space left."""
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, *st[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------ checksums


def test_commit_writes_a_manifest_of_every_file(tmp_path):
    files = {"model.pt": b"weights" * 100, "dcp/.metadata": b"meta", "dcp/__0_0.distcp": b"x"}
    ckpt = save_checkpoint(checkpoint_dir(tmp_path, 10), _write(files))
    manifest = json.loads((ckpt / CHECKSUMS_FILE).read_text())
    assert manifest["algorithm"] == "sha256"
    assert manifest["files"] == {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in files.items()
    }
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    want = hashlib.sha256((ckpt / CHECKSUMS_FILE).read_bytes()).hexdigest()
    assert marker["checksums_sha256"] == want
    assert verify_checkpoint(ckpt) is None and ensure_valid_checkpoint(ckpt) == ckpt


def test_flipped_byte_falls_back_to_the_previous_checkpoint_with_a_warning(tmp_path):
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == bad
    _flip_byte(bad / "sub" / "rng_rank0.pt")
    assert "sub/rng_rank0.pt fails its sha256 checksum" in verify_checkpoint(bad)
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*checkpoint-2.*rng_rank0"):
        assert latest_checkpoint(tmp_path) == good
    # still listed (complete), so nothing deletes the evidence silently
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    # explicitly named: refused, naming the file and the fix
    with pytest.raises(ValueError, match=r"checkpoint-2.* is damaged: sub/rng_rank0.pt fails"):
        ensure_valid_checkpoint(bad)
    # every checkpoint damaged: nothing to resume from
    _flip_byte(good / "model.pt")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: (c / "model.pt").write_bytes(b"short"), r"model.pt has 5 bytes, not the 4096"),
        (lambda c: (c / "model.pt").unlink(), "model.pt is missing"),
        (lambda c: _flip_byte(c / CHECKSUMS_FILE, 5), f"{CHECKSUMS_FILE} fails its checksum"),
        (lambda c: (c / CHECKSUMS_FILE).unlink(), f"{CHECKSUMS_FILE} is missing"),
        (lambda c: (c / COMPLETE_MARKER).write_text("{not json"), "marker is unreadable"),
        (lambda c: (c / COMPLETE_MARKER).unlink(), "no COMPLETE marker"),
    ],
)
def test_each_kind_of_damage_is_named(tmp_path, damage, reason):
    ckpt = _save(tmp_path, 3)
    damage(ckpt)
    assert reason in verify_checkpoint(ckpt)
    with pytest.raises(ValueError, match="is damaged"):
        ensure_valid_checkpoint(ckpt)


def test_checkpoint_saved_before_checksums_still_loads_unverified(tmp_path):
    ckpt = _save(tmp_path, 5)
    (ckpt / CHECKSUMS_FILE).unlink()  # what a checkpoint of an older fastwan looks like
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    del marker["checksums_sha256"]
    (ckpt / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert verify_checkpoint(ckpt) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no noise on --resume latest
        assert latest_checkpoint(tmp_path) == ckpt
    with pytest.warns(UserWarning, match="no checksums.json .* loading it unverified"):
        assert ensure_valid_checkpoint(ckpt) == ckpt


# ------------------------------------------------------------------ write failures


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.ENOSPC, r"disk full \(no space left on device\)"), (errno.EROFS, "read-only")],
)
def test_os_error_mid_write_says_why_and_keeps_earlier_checkpoints(tmp_path, code, reason):
    good = _save(tmp_path, 1)
    before = _snapshot(good)

    def crash(tmp: Path) -> None:
        (tmp / "model.pt").write_bytes(b"half a tensor")
        raise OSError(code, os.strerror(code), str(tmp / "model.pt"))

    final = checkpoint_dir(tmp_path, 2)
    with pytest.raises(WriteError, match=reason) as info:
        save_checkpoint(final, crash)
    assert f"could not write checkpoint {str(final)!r}" in str(info.value)
    assert "Earlier checkpoints are untouched" in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.errno == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert _snapshot(good) == before and latest_checkpoint(tmp_path) == good


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_torch_save_enforce_fail_on_a_full_disk_says_disk_full(tmp_path, monkeypatch):
    """PyTorch reports a full disk as ``[enforce fail at inline_container.cc:...]``."""
    good = _save(tmp_path, 1)

    def write(tmp: Path) -> None:
        torch.save({"w": torch.zeros(1000)}, "/dev/full")  # the real PyTorch error

    with pytest.raises(RuntimeError, match="enforce fail"):  # disk not full: raw, unlabelled
        save_checkpoint(checkpoint_dir(tmp_path, 2), write)
    _full_disk(monkeypatch)
    with pytest.raises(WriteError, match=r"checkpoint-2.*: disk full .*enforce fail") as info:
        save_checkpoint(checkpoint_dir(tmp_path, 2), write)
    assert info.value.errno == errno.ENOSPC
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_disk_full_while_committing_keeps_the_replaced_checkpoint(tmp_path, monkeypatch):
    old = _save(tmp_path, 4, **{"model.pt": b"old"})
    real = checkpoint_io._write_durably

    def full(path: Path, data: bytes) -> None:
        if path.name == CHECKSUMS_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint_io, "_write_durably", full)
    with pytest.raises(WriteError, match="checkpoint-4.*disk full"):
        _save(tmp_path, 4, **{"model.pt": b"new"})  # re-saving the same step
    assert (old / "model.pt").read_bytes() == b"old" and verify_checkpoint(old) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_read_only_output_dir_fails_at_prepare(tmp_path, monkeypatch):
    real = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    with pytest.raises(WriteError, match=r"checkpoint-1.*read-only file system"):
        _save(tmp_path / "ro", 1)


# ------------------------------------------------------------------------ kill -9

_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from fastwan.train.checkpoint_io import checkpoint_dir, save_checkpoint

    root, phase = Path(sys.argv[1]), sys.argv[2]

    def hang():
        print("ready", flush=True)
        time.sleep(600)  # killed here

    real_replace = os.replace

    def replace(src, dst):
        if phase == "commit" and str(src).endswith(".incomplete"):
            hang()  # manifest and marker written, not yet renamed
        real_replace(src, dst)

    os.replace = replace

    def write(tmp):
        (tmp / "model.pt").write_bytes(os.urandom(1 << 20))
        if phase == "write":
            hang()

    save_checkpoint(checkpoint_dir(root, 2), write)
    """
)


@pytest.mark.parametrize("phase", ["write", "commit"])
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_latest(tmp_path, phase):
    good = _save(tmp_path, 1)
    before = _snapshot(good)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path), phase],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert latest_checkpoint(tmp_path) == good and _snapshot(good) == before
    assert verify_checkpoint(good) is None
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [".checkpoint-2.incomplete", "checkpoint-1"]
    # the next save of that step starts clean
    again = _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == again and verify_checkpoint(again) is None


# ------------------------------------------------------------------------ trainer


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    from _tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), num_layers=1)


def _trainer(wan_path, out: Path, steps: int = 4):
    from _tiny_wan import RandomSamples, collate_tensors

    from fastwan.config import (
        ModelConfig,
        OptimConfig,
        OptimConfigs,
        Recipe,
        TrainConfig,
        VSAConfig,
    )
    from fastwan.data.sampler import DistributedSampler, ResumableLoader
    from fastwan.methods.flow import FlowMethod
    from fastwan.models import load_transformer
    from fastwan.train.trainer import Trainer

    vsa = VSAConfig(sparsity=0.5, tile_size=(1, 2, 2), backend="torch")
    recipe = Recipe(
        model=ModelConfig(teacher="tiny"),
        train=TrainConfig(
            method="flow",
            max_steps=steps,
            global_batch_size=1,
            micro_batch_size=1,
            gradient_accumulation_steps=1,
            mixed_precision="fp32",
            seed=7,
            log_interval=1,
            checkpoint_interval=0,
            output_dir=str(out),
        ),
        optim=OptimConfigs(generator=OptimConfig(lr=1e-3)),
        vsa=vsa,
    )
    data = RandomSamples(4, latent=(16, 2, 8, 8))
    loader = ResumableLoader(
        data, DistributedSampler(len(data), batch_size=1, seed=3), collate_fn=collate_tensors
    )
    method = FlowMethod(load_transformer(wan_path), vsa, flow_shift=3.0)
    return Trainer(method, recipe, loader, log_fn=lambda _line: None)


def test_trainer_resume_latest_skips_a_damaged_checkpoint(wan_path, tmp_path):
    first = _trainer(wan_path, tmp_path)
    first.train(1)
    one = first.save_checkpoint()
    first.train(1)
    two = first.save_checkpoint()
    shard = two / "dcp" / "__0_0.distcp"  # DCP's file: networks, optimizers, RNG states ...
    _flip_byte(shard)  # the crash: OSError [Errno 22] reading a damaged file
    resumed = _trainer(wan_path, tmp_path)
    with pytest.warns(
        UserWarning, match=r"skipping damaged checkpoint .*checkpoint-2.*dcp/__0_0.distcp fails"
    ):
        assert resumed.resume() == one
    assert resumed.step == 1


def test_trainer_resume_of_a_named_damaged_checkpoint_names_the_file(wan_path, tmp_path):
    """Needs ``Trainer.resume`` to call ``ensure_valid_checkpoint`` on a path it is given."""
    first = _trainer(wan_path, tmp_path)
    first.train(1)
    ckpt = first.save_checkpoint()
    _flip_byte(ckpt / "dcp" / ".metadata")
    with pytest.raises(ValueError, match=r"checkpoint-1.* is damaged: dcp/.metadata fails"):
        _trainer(wan_path, tmp_path).resume(ckpt)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_trainer_checkpoint_on_a_full_disk_says_so(wan_path, tmp_path, monkeypatch):
    trainer = _trainer(wan_path, tmp_path)
    trainer.train(1)
    one = trainer.save_checkpoint()
    before = _snapshot(one)
    trainer.train(1)
    real_save = torch.save

    def full_save(obj, f, *args, **kwargs):  # DCP writing a tensor into its shard file
        if isinstance(obj, torch.Tensor) and obj.numel() >= 1000:
            f = "/dev/full"
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_save)
    _full_disk(monkeypatch)
    with pytest.raises(WriteError, match=r"checkpoint-2.*: disk full") as info:
        trainer.save_checkpoint()
    assert "enforce fail at inline_container.cc" in str(info.value)
    assert "(on rank 0, in torch.distributed.checkpoint)" in str(info.value)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == one and _snapshot(one) == before
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
