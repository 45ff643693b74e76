"""Writing (and reading back) videos: MP4 through imageio-ffmpeg or PyAV, GIF through
Pillow. Frames are ``[F, H, W, 3]`` (or ``[1, F, H, W, 3]``), float in [0, 1] or uint8."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

MP4_SUFFIXES = (".mp4", ".mov", ".mkv")
VIDEO_BACKENDS = ("auto", "imageio-ffmpeg", "pyav")


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


def _write_imageio_ffmpeg(arr: np.ndarray, path: Path, fps: float, quality: int) -> None:
    import imageio_ffmpeg

    _, h, w, _ = arr.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, quality=quality, macro_block_size=1, ffmpeg_log_level="error"
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in arr:
            writer.send(frame)
    finally:
        writer.close()


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
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MP4_SUFFIXES + (".gif",):
        raise ValueError(
            f"output {str(path)!r} must end in one of {MP4_SUFFIXES + ('.gif',)}; e.g. out.mp4"
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not isinstance(quality, int) or not 0 <= quality <= 10:
        raise ValueError(f"quality must be an int in [0, 10], got {quality!r}")
    arr = to_uint8_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in arr]
        duration = max(1, round(1000.0 / fps))  # ms per frame
        images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
        return path
    writer = {"imageio-ffmpeg": _write_imageio_ffmpeg, "pyav": _write_pyav}[_pick_backend(backend)]
    writer(_pad_even(arr), path, float(fps), quality)
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
