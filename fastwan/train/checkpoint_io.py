"""Crash-safe checkpoint directories and RNG state capture / restore.

This is the storage layer: what a *training* checkpoint holds (networks, optimizers, ...
through ``torch.distributed.checkpoint``) is :mod:`fastwan.train.checkpoint`, which writes
its files with the two-phase commit below.

A checkpoint is a directory ``<root>/checkpoint-<step>`` holding whatever its writer
writes plus a marker file ``COMPLETE``. Saving is atomic:

1. the files go into a temporary sibling ``<root>/.checkpoint-<step>.incomplete``;
2. every file in it is hashed (sha256) and fsync'ed, and the hashes and sizes go into a
   manifest ``checksums.json`` in the same directory;
3. the marker is written last (and fsync'ed), recording the manifest's own sha256;
4. the temporary directory is renamed to its final name (``os.replace``; an existing
   checkpoint of the same step is moved aside first and deleted after), and the parent
   directory is fsync'ed.

A crash at any point leaves either the previous state or a hidden ``.incomplete``
directory; :func:`latest_checkpoint` only returns directories with the marker, so a
resumed run never loads a half-written checkpoint. The next save of the same step (or
:func:`prune_checkpoints`) removes such leftovers.

Multi-process saves (every rank writes its shards into one directory): rank 0 calls
:func:`prepare_checkpoint_dir`, all ranks write into the returned path after a barrier,
and after a second barrier rank 0 calls :func:`commit_checkpoint_dir`. In one process
:func:`save_checkpoint` does all three. A write that fails because the disk is full or
read-only becomes a :class:`~fastwan.fsutil.WriteError` saying so (:func:`save_error`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastwan.fsutil import WriteError, ensure_writable_dir, os_error_reason

__all__ = [
    "CHECKSUMS_FILE",
    "COMPLETE_MARKER",
    "capture_rng_state",
    "checkpoint_dir",
    "commit_checkpoint_dir",
    "ensure_valid_checkpoint",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "prepare_checkpoint_dir",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "save_error",
    "verify_checkpoint",
]

COMPLETE_MARKER = "COMPLETE"
CHECKSUMS_FILE = "checksums.json"
_CHECKSUMS_KEY = "checksums_sha256"  # in the marker: the manifest's own hash
_CHUNK = 8 << 20
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_SUFFIX = ".incomplete"
_OLD_SUFFIX = ".replaced"


# --------------------------------------------------------------------------- utilities


def _fsync_dir(path: Path) -> None:
    # Directory fsync persists renames / new entries; not supported everywhere (Windows).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _in_threads(fn: Callable[[Path], Any], paths: list[Path]) -> list[Any]:
    # hashlib and fsync release the GIL: a checkpoint's few large files hash in parallel
    if len(paths) < 2:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, paths))


def _hash_and_fsync(path: Path) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = hashlib.sha256()
        with open(fd, "rb", closefd=False) as fh:  # the descriptor that is fsync'ed below
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        entry = {"sha256": digest.hexdigest(), "size": os.fstat(fd).st_size}
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def _hash_and_fsync_tree(root: Path) -> dict[str, dict[str, Any]]:
    """fsync every file and directory under ``root``; ``{relative path: {sha256, size}}``
    of its files (symlinks, the marker and the manifest excluded)."""
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if not p.is_symlink() and rel not in (COMPLETE_MARKER, CHECKSUMS_FILE):
                paths.append(p)
    entries = _in_threads(_hash_and_fsync, paths)
    for dirpath, _dirnames, _filenames in os.walk(root):
        _fsync_dir(Path(dirpath))
    return {p.relative_to(root).as_posix(): e for p, e in zip(paths, entries)}


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """``<root>/checkpoint-<step>``."""
    _check_step(step)
    return Path(root) / f"checkpoint-{step}"


def _tmp_dir(final: Path) -> Path:
    return final.parent / f".{final.name}{_TMP_SUFFIX}"


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding the ``COMPLETE`` marker (cheap: no hashing;
    :func:`verify_checkpoint` also checks the files against their checksums)."""
    path = Path(path)
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


# ------------------------------------------------------------------- write failures


_FULL_FIX = (
    "free space on that disk, set train.output_dir to a directory on another one, or keep "
    "fewer checkpoints (train.checkpoints_total_limit)"
)
_SAVE_FIXES = {
    errno.ENOSPC: _FULL_FIX,
    getattr(errno, "EDQUOT", errno.ENOSPC): _FULL_FIX,
    errno.EROFS: "set train.output_dir to a directory on a writable disk",
    errno.EACCES: "fix the directory's permissions or set train.output_dir to one you own",
    errno.EPERM: "fix the directory's permissions or set train.output_dir to one you own",
    errno.ENOTDIR: "set train.output_dir to a path whose parents are directories",
}


def _disk_errno(where: Path) -> int | None:
    """Why writing under ``where`` fails, read off the disk (read-only mount, no free
    space, or a small probe write failing), or None when the disk looks fine."""
    try:
        st = os.statvfs(where)
    except (OSError, AttributeError):  # no statvfs on Windows
        st = None
    if st is not None:
        if st.f_flag & getattr(os, "ST_RDONLY", 1):
            return errno.EROFS
        if st.f_bavail * st.f_frsize < _CHUNK:  # not even one more chunk fits
            return errno.ENOSPC
    try:
        ensure_writable_dir(where, "checkpoint")
    except WriteError as err:
        return err.errno
    return None


def save_error(err: BaseException, final: Path, where: Path) -> WriteError | None:
    """A clear error for a save of ``final`` that raised ``err`` because the disk is full /
    read-only / not permitted, else None (the original error is the better message).

    torch.save reports a full disk as a bare ``RuntimeError`` ("[enforce fail at
    inline_container.cc:...] unexpected pos", "file write failed") without an errno, so
    the disk itself is asked. Call this before removing the partial files (which frees
    the space that ran out).
    """
    if not isinstance(err, (OSError, RuntimeError)):
        return None
    code = getattr(err, "errno", None) if os_error_reason(err) is not None else None
    if code is None:
        code = _disk_errno(where if where.is_dir() else final.parent)
    if code is None or os_error_reason(OSError(code, "")) is None:
        return None
    fix = _SAVE_FIXES.get(code, "set train.output_dir to a directory you can write")
    return WriteError(
        f"could not write checkpoint {str(final)!r}: {os_error_reason(OSError(code, ''))}; "
        f"{fix}. Earlier checkpoints are untouched. [{type(err).__name__}: {err}]",
        code,
    )


# ------------------------------------------------------------------------------ saving


def prepare_checkpoint_dir(final_dir: str | Path) -> Path:
    """Create (empty) the temporary directory to write ``final_dir``'s files into.

    A stale temporary directory from a crashed save is removed first.
    """
    final = Path(final_dir)
    if not final.name:
        raise ValueError(f"final_dir must name a directory, got {str(final_dir)!r}")
    tmp = _tmp_dir(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as err:
        clear = save_error(err, final, final.parent)
        if clear is None:
            raise
        raise clear from err
    return tmp


def commit_checkpoint_dir(
    tmp_dir: str | Path, final_dir: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Hash and fsync ``tmp_dir``, write the manifest and then the marker, rename it to
    ``final_dir``; returns it.

    ``metadata`` (JSON-serialisable) is stored in the marker file. A failure (disk full,
    read-only) raises a clear error and leaves ``final_dir`` as it was; ``tmp_dir`` is
    left for the caller (or the next save / prune) to remove.
    """
    tmp, final = Path(tmp_dir), Path(final_dir)
    if not tmp.is_dir():
        raise ValueError(f"tmp_dir {str(tmp)!r} does not exist; call prepare_checkpoint_dir")
    try:
        files = _hash_and_fsync_tree(tmp)
        manifest = json.dumps(
            {"algorithm": "sha256", "files": files}, indent=1, sort_keys=True
        ).encode()
        _write_durably(tmp / CHECKSUMS_FILE, manifest)
        marker = {
            "saved_at": time.time(),
            **dict(metadata or {}),
            _CHECKSUMS_KEY: hashlib.sha256(manifest).hexdigest(),
        }
        _write_durably(tmp / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True).encode())
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}{_OLD_SUFFIX}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:  # put the replaced checkpoint back
                os.replace(old, final)
            raise
    except OSError as err:
        clear = save_error(err, final, tmp)
        if clear is None:
            raise
        raise clear from err
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    final_dir: str | Path,
    write_fn: Callable[[Path], None],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically create ``final_dir`` with the files ``write_fn(tmp_dir)`` writes.

    If ``write_fn`` raises, the temporary directory is removed and the error propagates
    (as a :class:`~fastwan.fsutil.WriteError` naming the checkpoint and "disk full" /
    "read-only file system" when that is the cause); ``final_dir`` (and any earlier
    checkpoint) is untouched.
    """
    final = Path(final_dir)
    tmp = prepare_checkpoint_dir(final)
    try:
        write_fn(tmp)
        return commit_checkpoint_dir(tmp, final, metadata)
    except WriteError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as err:
        clear = save_error(err, final, tmp)  # before rmtree frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if clear is None:
            raise
        raise clear from err


# ------------------------------------------------------------------------ verifying


def verify_checkpoint(path: str | Path) -> str | None:
    """None when ``path`` is a complete checkpoint whose files match their checksums,
    else the reason (naming the file). Checkpoints saved before checksums existed (no
    manifest) pass unverified."""
    path = Path(path)
    if not path.is_dir():
        return f"{str(path)!r} is not a directory"
    marker_path = path / COMPLETE_MARKER
    if not marker_path.is_file():
        return f"it has no {COMPLETE_MARKER} marker (its save did not finish)"
    try:
        marker = json.loads(marker_path.read_bytes())
        if not isinstance(marker, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return f"its {COMPLETE_MARKER} marker is unreadable or corrupted ({err})"
    manifest_path = path / CHECKSUMS_FILE
    expected = marker.get(_CHECKSUMS_KEY)
    if expected is None and not manifest_path.exists():
        return None  # saved before checksums existed: unverified
    try:
        raw = manifest_path.read_bytes()
    except OSError as err:
        return f"{CHECKSUMS_FILE} is missing or unreadable ({err})"
    if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
        return f"{CHECKSUMS_FILE} fails its checksum (recorded in {COMPLETE_MARKER})"
    try:
        files = json.loads(raw)["files"]
        entries = [(rel, int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{CHECKSUMS_FILE} is corrupted ({type(err).__name__}: {err})"
    # sizes first: a truncated file is found without hashing the (large) rest
    for rel, size, _digest in entries:
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes, not the {size} it was saved with (truncated?)"

    def digest_of(file: Path) -> str | OSError:
        try:
            return _sha256(file)
        except OSError as err:
            return err

    digests = _in_threads(digest_of, [path / rel for rel, _size, _digest in entries])
    for (rel, _size, digest), got in zip(entries, digests):
        if isinstance(got, OSError):
            return f"{rel} cannot be read ({got})"
        if got != digest:
            return f"{rel} fails its sha256 checksum (the file changed after it was saved)"
    return None


def ensure_valid_checkpoint(path: str | Path) -> Path:
    """Return ``path`` if :func:`verify_checkpoint` passes, else raise ``ValueError``
    naming the checkpoint, the file and the fix. A checkpoint without checksums (saved
    before they existed) is returned with a warning that it is unverified."""
    path = Path(path)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ValueError(
            f"checkpoint {str(path)!r} is damaged: {reason}; resume from an earlier "
            "checkpoint-<step> (or --resume latest, which skips damaged ones)"
        )
    if not (path / CHECKSUMS_FILE).exists():
        warnings.warn(
            f"checkpoint {str(path)!r} has no {CHECKSUMS_FILE} (saved before checksums "
            "were added): loading it unverified",
            stacklevel=2,
        )
    return path


# ----------------------------------------------------------------------------- finding


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first (by marker,
    not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _NAME.match(entry.name)
        if m and is_complete(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete, valid checkpoint with the highest step under ``root``, or None.

    Incomplete ones (no marker, or hidden temporary directories) are ignored; a newer one
    that fails :func:`verify_checkpoint` (damaged after it was saved) is skipped with a
    warning naming it and the reason.
    """
    for _step, path in reversed(list_checkpoints(root)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        warnings.warn(
            f"skipping damaged checkpoint {str(path)!r}: {reason}; falling back to the "
            "previous complete one",
            stacklevel=2,
        )
    return None


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of crashed
    saves; returns what was deleted."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    root = Path(root)
    removed: list[Path] = []
    for _step, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path)
        removed.append(path)
    if root.is_dir():
        for entry in root.iterdir():
            name = entry.name
            stale = name.startswith(".checkpoint-") and (
                name.endswith(_TMP_SUFFIX) or name.endswith(_OLD_SUFFIX)
            )
            if stale and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


# --------------------------------------------------------------------------------- RNG


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, NumPy (global), torch CPU, CUDA (all devices, when available) and the named
    explicit ``torch.Generator`` states, as plain data that ``torch.load(weights_only=True)``
    accepts (each rank's ``rng.rank<R>`` piece of a training checkpoint)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        if not isinstance(gen, torch.Generator):
            raise ValueError(
                f"generators[{name!r}] must be a torch.Generator, got {type(gen).__name__}"
            )
        state["generators"][name] = gen.get_state()
    return state


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Restore what :func:`capture_rng_state` captured (generators are matched by name).

    CUDA states are restored when CUDA is available and were captured; a named generator
    missing from ``state`` raises ``ValueError``.
    """
    for key in ("python", "numpy", "torch", "generators"):
        if key not in state:
            raise ValueError(f"RNG state lacks {key!r}; pass a dict from capture_rng_state")
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            np.asarray(npst["keys"].numpy(), dtype=np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], device=i)
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise ValueError(
                f"RNG state has no generator {name!r} (it has "
                f"{sorted(state['generators'])}); pass the same names as when saving"
            )
        gen.set_state(state["generators"][name])
