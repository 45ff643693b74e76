"""Crash-safe checkpoint directories and RNG state capture / restore.

A checkpoint is a directory ``<root>/checkpoint-<step>`` holding whatever the trainer
writes (model / optimizer shards, the recipe, RNG states) plus a marker file
``COMPLETE``. Saving is atomic:

1. the files go into a temporary sibling ``<root>/.checkpoint-<step>.incomplete``;
2. every file and directory in it is fsync'ed;
3. the marker is written last (and fsync'ed);
4. the temporary directory is renamed to its final name (``os.replace``; an existing
   checkpoint of the same step is moved aside first and deleted after), and the parent
   directory is fsync'ed.

A crash at any point leaves either the previous state or a hidden ``.incomplete``
directory; :func:`latest_checkpoint` only returns directories with the marker, so a
resumed run never loads a half-written checkpoint. The next save of the same step (or
:func:`prune_checkpoints`) removes such leftovers.

Multi-process saves (every rank writes its shards into one directory): rank 0 calls
:func:`prepare_checkpoint_dir`, all ranks write into the returned path after a barrier,
and after a second barrier rank 0 calls :func:`commit_checkpoint_dir`. Single-process
code can use :func:`save_checkpoint`, which does all three.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "COMPLETE_MARKER",
    "capture_rng_state",
    "checkpoint_dir",
    "commit_checkpoint_dir",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_rng_state",
    "prepare_checkpoint_dir",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "save_rng_state",
]

COMPLETE_MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_SUFFIX = ".incomplete"
_OLD_SUFFIX = ".replaced"


# --------------------------------------------------------------------------- utilities


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_file(p)
        _fsync_dir(Path(dirpath))


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
    """Whether ``path`` is a directory holding the ``COMPLETE`` marker."""
    path = Path(path)
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


# ------------------------------------------------------------------------------ saving


def prepare_checkpoint_dir(final_dir: str | Path) -> Path:
    """Create (empty) the temporary directory to write ``final_dir``'s files into.

    A stale temporary directory from a crashed save is removed first.
    """
    final = Path(final_dir)
    if not final.name:
        raise ValueError(f"final_dir must name a directory, got {str(final_dir)!r}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint_dir(
    tmp_dir: str | Path, final_dir: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """fsync ``tmp_dir``, write the marker last, rename it to ``final_dir``; returns it.

    ``metadata`` (JSON-serialisable) is stored in the marker file.
    """
    tmp, final = Path(tmp_dir), Path(final_dir)
    if not tmp.is_dir():
        raise ValueError(f"tmp_dir {str(tmp)!r} does not exist; call prepare_checkpoint_dir")
    _fsync_tree(tmp)
    marker = {"saved_at": time.time(), **dict(metadata or {})}
    marker_path = tmp / COMPLETE_MARKER
    with open(marker_path, "w") as fh:
        json.dump(marker, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}{_OLD_SUFFIX}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
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

    If ``write_fn`` raises, the temporary directory is removed and the error propagates;
    ``final_dir`` (and any earlier checkpoint) is untouched.
    """
    final = Path(final_dir)
    tmp = prepare_checkpoint_dir(final)
    try:
        write_fn(tmp)
        return commit_checkpoint_dir(tmp, final, metadata)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- finding


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
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
    """The complete checkpoint with the highest step under ``root``, or None.

    Incomplete ones (no marker, or hidden temporary directories) are ignored.
    """
    found = list_checkpoints(root)
    return found[-1][1] if found else None


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
    accepts."""
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


def save_rng_state(
    path: str | Path, generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """``torch.save`` of :func:`capture_rng_state` (one file per rank, e.g. ``rng_rank0.pt``)."""
    torch.save(capture_rng_state(generators), Path(path))


def load_rng_state(
    path: str | Path, generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Load a file written by :func:`save_rng_state` and restore it."""
    state = torch.load(Path(path), weights_only=True)
    restore_rng_state(state, generators)
