"""Failed video writes raise (issue 15 item 1), with both MP4 backends and GIF; and the
output-directory checks of :mod:`fastwan.fsutil` they (and train / generate) rely on.

imageio-ffmpeg's writer used to swallow ffmpeg's "Error opening output": a target that is
a directory, or a read-only / full disk, returned "success" and wrote nothing. Tests run
as root, which ignores permission bits, so read-only and full disks are simulated: an
``os.open`` that fails with EROFS, and real writes into ``/dev/full`` (ENOSPC).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from fastwan import video_io
from fastwan.fsutil import WriteError, describe_os_error, ensure_writable_dir
from fastwan.video_io import check_video_output, read_video, save_video

BACKENDS = ["imageio-ffmpeg", "pyav"]
WRITERS = {"imageio-ffmpeg": "_write_imageio_ffmpeg", "pyav": "_write_pyav"}


def _frames(n: int = 4) -> np.ndarray:
    ramp = np.linspace(0, 200, 16, dtype=np.uint8)[None, None, :, None]
    step = (np.arange(n, dtype=np.uint8) * 12)[:, None, None, None]  # frames differ (GIF)
    return np.ascontiguousarray(np.broadcast_to(ramp + step, (n, 8, 16, 3)))


def _backend(name: str) -> str:
    if name == "pyav":
        pytest.importorskip("av", reason="PyAV is the optional second MP4 writer")
    return name


def _no_leftovers(folder: Path) -> None:
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert hidden == [], f"temporary files left behind: {hidden}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_that_is_a_directory_raises_naming_it(tmp_path, backend):
    target = tmp_path / "out.mp4"
    target.mkdir()
    with pytest.raises(WriteError, match="is a directory") as info:
        save_video(_frames(), target, backend=_backend(backend))
    assert str(target) in str(info.value)
    # a ValueError (the CLI prints it, no traceback) and an OSError with its errno
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.EISDIR
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("backend", BACKENDS + ["gif"])
def test_parent_that_is_a_file_raises(tmp_path, backend):
    (tmp_path / "notes").write_text("a file, not a folder")
    suffix = ".gif" if backend == "gif" else ".mp4"
    target = tmp_path / "notes" / "sub" / f"out{suffix}"
    kw = {} if backend == "gif" else {"backend": _backend(backend)}
    with pytest.raises(WriteError, match="is a file, not a directory") as info:
        save_video(_frames(), target, **kw)
    assert str(target) in str(info.value) and str(tmp_path / "notes") in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS + ["gif"])
def test_read_only_folder_raises_before_encoding(tmp_path, monkeypatch, backend):
    folder = tmp_path / "ro"
    folder.mkdir()
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    suffix = ".gif" if backend == "gif" else ".mp4"
    kw = {} if backend == "gif" else {"backend": _backend(backend)}
    with pytest.raises(WriteError, match="read-only file system") as info:
        save_video(_frames(), folder / f"out{suffix}", **kw)
    assert str(folder / f"out{suffix}") in str(info.value)
    assert info.value.errno == errno.EROFS
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_while_encoding_raises_and_leaves_no_file(tmp_path, monkeypatch, backend):
    """The real encoder writes into /dev/full (every write: ENOSPC)."""
    _backend(backend)
    full = tmp_path / "full.mp4"
    full.symlink_to("/dev/full")
    real = getattr(video_io, WRITERS[backend])
    monkeypatch.setattr(video_io, WRITERS[backend], lambda arr, _p, fps, q: real(arr, full, fps, q))
    target = tmp_path / "out" / "video.mp4"
    with pytest.raises(WriteError, match=r"disk full \(no space left on device\)") as info:
        save_video(_frames(), target, backend=backend)
    assert str(target) in str(info.value) and info.value.errno == errno.ENOSPC
    assert not target.exists()
    _no_leftovers(target.parent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_that_writes_nothing_is_caught(tmp_path, monkeypatch, backend):
    """The old failure mode: the writer returns normally and no file exists."""
    _backend(backend)
    monkeypatch.setattr(video_io, WRITERS[backend], lambda *_a: None)
    with pytest.raises(WriteError, match="wrote no data") as info:
        save_video(_frames(), tmp_path / "v.mp4", backend=backend)
    assert str(tmp_path / "v.mp4") in str(info.value)


def test_ffmpeg_failure_text_becomes_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(
        video_io,
        "_run_ffmpeg",
        lambda *_a: (1, "Error opening output x.mp4: Read-only file system"),
    )
    with pytest.raises(WriteError, match="read-only file system"):
        save_video(_frames(), tmp_path / "v.mp4", backend="imageio-ffmpeg")
    monkeypatch.setattr(video_io, "_run_ffmpeg", lambda *_a: (1, "Unknown encoder 'libx264'"))
    with pytest.raises(WriteError, match="Unknown encoder 'libx264'.*free space"):
        save_video(_frames(), tmp_path / "v.mp4", backend="imageio-ffmpeg")
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_write_keeps_the_existing_video(tmp_path, monkeypatch, backend):
    target = save_video(_frames(6), tmp_path / "v.mp4", backend=_backend(backend))
    before = target.read_bytes()

    def crash(arr, path, fps, quality):
        path.write_bytes(b"half a video")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(video_io, WRITERS[backend], crash)
    with pytest.raises(WriteError, match="disk full"):
        save_video(_frames(3), target, backend=backend)
    assert target.read_bytes() == before
    assert read_video(target)[0].shape == (6, 8, 16, 3)
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS + ["gif"])
def test_good_write_creates_folders_and_leaves_only_the_video(tmp_path, backend):
    suffix = ".gif" if backend == "gif" else ".mp4"
    kw = {} if backend == "gif" else {"backend": _backend(backend)}
    target = save_video(_frames(), tmp_path / "a" / "b" / f"v{suffix}", fps=8, **kw)
    assert [p.name for p in target.parent.iterdir()] == [f"v{suffix}"]
    frames, fps = read_video(target)
    assert frames.shape == (4, 8, 16, 3)
    assert fps == pytest.approx(8, rel=0.05)  # GIF stores durations in 10 ms units


def test_check_video_output_refuses_early_without_writing(tmp_path):
    """What commands call before loading models: nothing is encoded or left behind."""
    target = tmp_path / "new" / "v.mp4"
    assert check_video_output(target) == target and list(target.parent.iterdir()) == []
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ValueError, match="d.mp4'?: it is a directory"):
        check_video_output(tmp_path / "d.mp4")
    with pytest.raises(ValueError, match="must end in one of"):
        check_video_output(tmp_path / "v.avi")


# ------------------------------------------------------------- fastwan.fsutil


def test_ensure_writable_dir_creates_and_proves_it(tmp_path):
    target = tmp_path / "a" / "b"
    assert ensure_writable_dir(target, "--output-dir") == target
    assert target.is_dir() and list(target.iterdir()) == []  # the probe file is gone
    assert ensure_writable_dir(str(target), "--output-dir") == target  # exists already


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EROFS, "read-only file system"),
        (errno.ENOSPC, r"disk full \(no space left on device\)"),
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "permission denied"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_ensure_writable_dir_names_setting_path_reason_and_fix(tmp_path, monkeypatch, code, reason):
    def failing_mkstemp(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("fastwan.fsutil.tempfile.mkstemp", failing_mkstemp)
    with pytest.raises(
        WriteError, match=f"train.output_dir: .* is not writable \\({reason}\\); "
    ) as info:
        ensure_writable_dir(tmp_path / "run", "train.output_dir")
    assert str(tmp_path / "run") in str(info.value) and info.value.errno == code
    assert isinstance(info.value, ValueError)


def test_ensure_writable_dir_refuses_files_and_file_parents(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--output-dir: .* is a file, not a directory"):
        ensure_writable_dir(tmp_path / "f", "--output-dir")
    with pytest.raises(ValueError, match="cannot create .* is a file, not a directory"):
        ensure_writable_dir(tmp_path / "f" / "deeper" / "run", "--output-dir")


def test_ensure_writable_dir_min_free_bytes(tmp_path, monkeypatch):
    assert ensure_writable_dir(tmp_path, "x", min_free_bytes=1) == tmp_path
    usage = type("Usage", (), {"total": 10 << 30, "used": 10 << 30, "free": 3 << 20})
    monkeypatch.setattr("fastwan.fsutil.shutil.disk_usage", lambda _p: usage)
    with pytest.raises(WriteError, match=r"x: .* has 3.0 MiB free, less than the 1.0 GiB needed"):
        ensure_writable_dir(tmp_path, "x", min_free_bytes=1 << 30)


def test_describe_os_error_maps_each_errno():
    def said(code):
        return describe_os_error(OSError(code, os.strerror(code)), "/data/out.mp4")

    assert said(errno.ENOSPC).startswith(
        "cannot write '/data/out.mp4': disk full (no space left on device); free space"
    )
    assert "read-only file system" in said(errno.EROFS)
    assert "permission denied" in said(errno.EACCES) and "permission denied" in said(errno.EPERM)
    assert "is a directory" in said(errno.EISDIR)
    assert "disk quota exceeded" in said(errno.EDQUOT)
    assert said(errno.EIO) == f"cannot write '/data/out.mp4': {os.strerror(errno.EIO)}"
    assert describe_os_error(OSError("odd"), "p") == "cannot write 'p': odd"
