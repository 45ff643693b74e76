"""Writing (and reading back) videos: MP4 through imageio-ffmpeg's ffmpeg or PyAV, GIF
through Pillow. Frames are ``[F, H, W, 3]`` (or ``[1, F, H, W, 3]``), float in [0, 1] or
uint8. A write that fails raises naming the path and the reason, with every backend."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np

from fastwan.choices import VIDEO_BACKENDS
from fastwan.fsutil import WriteError, describe_os_error, ensure_writable_dir, os_error_reason

MP4_SUFFIXES = (".mp4", ".mov", ".mkv")


def to_uint8_frames(frames) -> np.ndarray:
    """Frames as a C-contiguous uint8 ``[F, H, W, 3]`` array.

    Accepts numpy arrays or torch tensors, ``[F, H, W, C]`` or ``[1, F, H, W, C]`` with
    C in {1, 3}; floats are taken to be in [0, 1] (clipped), integers in [0, 255].
    """
    if hasattr(frames, "detach"):  # a torch tensor
        frames = (
            frames.detach().float().cpu().numpy()
            if frames.is_floating_point()
            else frames.cpu().numpy()
        )
    arr = np.asarray(frames)
    if arr.ndim == 5:
        if arr.shape[0] != 1:
            raise ValueError(
                f"frames has a batch of {arr.shape[0]} videos {arr.shape}; save one at a time "
                "(frames[i])"
            )
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.shape[0] == 0:
        raise ValueError(
            f"frames must be [F, H, W, 3] (or [1, F, H, W, 3]) with F >= 1, got {arr.shape}"
        )
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def _pad_even(arr: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: replicate the last row/column where odd."""
    _, h, w, _ = arr.shape
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return arr


def _run_ffmpeg(cmd: list[str], data: memoryview) -> tuple[int, str]:
    """Run ffmpeg with ``data`` on stdin; its exit code and stderr (a seam for tests)."""
    proc = subprocess.run(
        cmd, input=data, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    return proc.returncode, proc.stderr.decode("utf-8", "replace")


def _ffmpeg_errno(stderr: str) -> int | None:
    """The errno whose message ffmpeg printed ("No space left on device", ...), if any."""
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EISDIR, errno.ENOTDIR):
        if os.strerror(code) in stderr:
            return code
    if hasattr(errno, "EDQUOT") and os.strerror(errno.EDQUOT) in stderr:
        return errno.EDQUOT
    return None


def _write_imageio_ffmpeg(arr: np.ndarray, path: Path, fps: float, quality: int) -> None:
    # imageio_ffmpeg.write_frames never looks at ffmpeg's exit code, so an output ffmpeg
    # cannot open or fill ("Error opening output", a full disk) passed as success: run its
    # ffmpeg binary here with the same settings and check the exit code.
    import imageio_ffmpeg

    _, h, w, _ = arr.shape
    crf = int((1 - quality / 10.0) * 51)  # imageio-ffmpeg's quality -> x264 crf mapping
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-y",
        "-f", "rawvideo",
        "-vcodec", "rawvideo",
        "-s", f"{w}x{h}",
        "-pix_fmt", "rgb24",
        "-r", str(Fraction(fps).limit_denominator()),
        "-i", "-",
        "-an",
        "-vcodec", "libx264",
        "-pix_fmt", "yuv420p",
        "-crf", str(crf),
        "-v", "error",
        str(path),
    ]  # fmt: skip
    code, stderr = _run_ffmpeg(cmd, memoryview(arr).cast("B"))
    if code != 0:
        detail = " ".join(stderr.split())[:300] or f"exit code {code}"
        raise OSError(_ffmpeg_errno(stderr), f"ffmpeg failed: {detail}")


def _write_pyav(arr: np.ndarray, path: Path, fps: float, quality: int) -> None:
    import av

    _, h, w, _ = arr.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # imageio-ffmpeg's quality 0..10 maps onto x264's crf 51..0 the same way.
        stream.options = {"crf": str(round(51 - 5.1 * quality))}
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


def _write_gif(arr: np.ndarray, path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in arr]
    duration = max(1, round(1000.0 / fps))  # ms per frame
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0
    )


def _check_suffix(path: Path) -> Path:
    if path.suffix.lower() not in MP4_SUFFIXES + (".gif",):
        raise ValueError(
            f"output {str(path)!r} must end in one of {MP4_SUFFIXES + ('.gif',)}; e.g. out.mp4"
        )
    return path


def check_video_output(path: str | Path) -> Path:
    """Refuse, before any work, an output ``save_video`` could not write: a wrong suffix, a
    path that is a directory, a folder that cannot be created or written (read-only
    file system, a parent that is a file, ...). Creates the folder; returns the path.

    Commands call it before loading models (``save_video`` calls it again)."""
    path = _check_suffix(Path(path))
    if path.is_dir():
        raise WriteError(
            f"cannot write video {str(path)!r}: it is a directory; pass a file path such as "
            f"{str(path / ('video' + path.suffix))!r}",
            errno.EISDIR,
        )
    ensure_writable_dir(path.parent, f"cannot write video {str(path)!r}")
    return path


def _no_free_space(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free == 0
    except OSError:
        return False


def _write_failed(path: Path, err: OSError) -> WriteError:
    """A clear error for a write that failed (``err`` names the hidden temporary file)."""
    code = err.errno
    if os_error_reason(err) is None and _no_free_space(path.parent):
        code = errno.ENOSPC  # an encoder error that did not say why, on a full disk
    detail = err.strerror or str(err)
    message = describe_os_error(OSError(code, detail), path).replace(
        "cannot write ", "cannot write video ", 1
    )
    if os_error_reason(OSError(code, detail)) is None:
        message += "; check the path, its permissions and the free space on its disk"
    elif "ffmpeg" in detail:
        message += f" ({detail})"
    return WriteError(message, code)


def _pick_backend(backend: str) -> str:
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"backend must be one of {VIDEO_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    for name, module in (("imageio-ffmpeg", "imageio_ffmpeg"), ("pyav", "av")):
        try:
            __import__(module)
            return name
        except ImportError:
            continue
    raise ValueError("writing MP4 needs imageio-ffmpeg or PyAV: pip install imageio-ffmpeg")


def save_video(
    frames,
    path: str | Path,
    fps: float = 16,
    *,
    backend: str = "auto",
    quality: int = 8,
) -> Path:
    """Write ``frames`` to ``path``: H.264 MP4 (``.mp4``/``.mov``/``.mkv``) or GIF (``.gif``).

    fps: frames per second. quality: 0..10 for MP4 (imageio-ffmpeg's scale). Odd frame
    sizes are padded by one edge pixel for MP4 (yuv420p). Returns the path.

    A video that cannot be written raises :class:`~fastwan.fsutil.WriteError` (a
    ``ValueError`` and an ``OSError``) naming the path and the reason ("is a directory",
    "read-only file system", "disk full (no space left on device)", ...); the target is
    checked first (:func:`check_video_output`) and the file is checked after writing.
    The video is encoded into a hidden sibling and renamed, so a failure leaves no
    truncated file (and keeps a video that was already at ``path``).
    """
    path = _check_suffix(Path(path))
    suffix = path.suffix.lower()
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not isinstance(quality, int) or not 0 <= quality <= 10:
        raise ValueError(f"quality must be an int in [0, 10], got {quality!r}")
    arr = to_uint8_frames(frames)
    writer = None
    if suffix != ".gif":
        writer = {"imageio-ffmpeg": _write_imageio_ffmpeg, "pyav": _write_pyav}[
            _pick_backend(backend)
        ]
    check_video_output(path)
    # Encode into a hidden sibling and rename: a failed or interrupted write leaves no
    # truncated video at ``path`` (nor clobbers one already there).
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        if writer is None:
            _write_gif(arr, tmp, float(fps))
        else:
            writer(_pad_even(arr), tmp, float(fps), quality)
        if not tmp.is_file() or tmp.stat().st_size == 0:  # a writer that failed silently
            raise OSError(None, "the encoder reported success but wrote no data")
        os.replace(tmp, path)
    except OSError as err:
        raise _write_failed(path, err) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a video file: frames uint8 ``[F, H, W, 3]`` and its fps."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video {str(path)!r} does not exist")
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
            duration = im.info.get("duration", 0) or 0
        return np.stack(frames), (1000.0 / duration if duration else 0.0)
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames), float(meta["fps"])
