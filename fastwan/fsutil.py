"""Clear errors for output paths that cannot be written (stdlib only, no torch).

:func:`ensure_writable_dir` proves an output directory is writable before any work starts
(a run should not load models for minutes and then fail on a read-only mount);
:func:`describe_os_error` turns a write that failed mid-way (``OSError`` errno 28, 30, ...)
into a sentence that says what happened and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["WriteError", "describe_os_error", "ensure_writable_dir", "os_error_reason"]

# errno -> (what happened, how to fix it)
_REASONS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "disk full (no space left on device)",
        "free space on that disk or write to another one",
    ),
    errno.EROFS: (
        "read-only file system",
        "write to a directory on a writable disk (or remount it read-write)",
    ),
    errno.EACCES: (
        "permission denied",
        "fix its permissions (chmod / chown) or write to a directory you own",
    ),
    errno.EPERM: (
        "permission denied",
        "fix its permissions (chmod / chown) or write to a directory you own",
    ),
    errno.EISDIR: (
        "is a directory",
        "pass a file path (e.g. inside that directory), or remove the directory",
    ),
    errno.ENOTDIR: (
        "a parent of it is a file, not a directory",
        "pass a path whose parents are directories",
    ),
}
if hasattr(errno, "EDQUOT"):  # not on every platform
    _REASONS[errno.EDQUOT] = (
        "disk quota exceeded",
        "free space within your quota or write to another disk",
    )


class WriteError(ValueError, OSError):
    """A write that cannot happen (or failed), with the path, the reason and the fix.

    A ``ValueError`` so the CLI prints it without a traceback, and an ``OSError`` (with the
    underlying ``errno`` when known) so callers catching ``OSError`` still see it.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        # Only errno is set: setting strerror/filename would change str() to OSError's form.
        self.errno = code


def os_error_reason(err: BaseException) -> str | None:
    """The short reason for a known errno ("read-only file system", ...), else None."""
    code = getattr(err, "errno", None)
    return _REASONS[code][0] if code in _REASONS else None


def describe_os_error(err: OSError, path: str | Path) -> str:
    """``"cannot write '<path>': <reason>; <fix>"`` for a failed write.

    Known errnos: ENOSPC (disk full), EROFS (read-only file system), EACCES / EPERM
    (permission denied), EISDIR (is a directory), ENOTDIR, EDQUOT (disk quota exceeded);
    any other error is described by its own text.
    """
    code = getattr(err, "errno", None)
    if code in _REASONS:
        reason, fix = _REASONS[code]
        return f"cannot write {str(path)!r}: {reason}; {fix}"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return f"cannot write {str(path)!r}: {text}"


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path  # unreachable: "/" or "." exists


def ensure_writable_dir(path: str | Path, what: str, *, min_free_bytes: int | None = None) -> Path:
    """Create directory ``path`` if needed and prove it is writable; returns it.

    A small temporary file is created, written and removed (permission bits alone say
    nothing for root or on a read-only mount). ``what`` names the setting in errors (e.g.
    ``"--output-dir"``, ``"train.output_dir"``). ``min_free_bytes``: also refuse when the
    disk has less free space than that. Raises :class:`WriteError` (a ``ValueError``) naming
    ``what``, the path, the reason and the fix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(
            f"{what}: {str(path)!r} is a file, not a directory; pass a directory path (or "
            "move the file away)",
            errno.ENOTDIR,
        )
    blocker = _first_existing(path)
    if blocker != path and not blocker.is_dir():
        raise WriteError(
            f"{what}: cannot create {str(path)!r}: {str(blocker)!r} is a file, not a "
            "directory; pass a path whose parents are directories",
            errno.ENOTDIR,
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fastwan-write-test-", dir=path)
        try:
            os.write(fd, b"fastwan")  # a zero-byte file needs no space: write a little
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        reason = os_error_reason(err)
        fix = _REASONS[err.errno][1] if reason else "check the path and its disk"
        reason = reason or (err.strerror or str(err))
        raise WriteError(
            f"{what}: {str(path)!r} is not writable ({reason}); {fix}", err.errno
        ) from err
    if min_free_bytes is not None:
        free = shutil.disk_usage(path).free
        if free < min_free_bytes:
            raise WriteError(
                f"{what}: {str(path)!r} has {_size(free)} free, less than the "
                f"{_size(min_free_bytes)} needed (no space left on device); free space on "
                "that disk or write to another one",
                errno.ENOSPC,
            )
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
