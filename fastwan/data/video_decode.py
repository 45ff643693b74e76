"""Decoding training clips: read a video, resample it to a frame rate, resize and centre-crop
it, cut it to a frame count. Decoding goes through PyAV (FFmpeg).

A clip is the first ``num_frames`` frames of the video at ``fps``: target frame ``k`` shows
the source frame nearest to time ``k / fps`` (frames are repeated when the source is slower,
dropped when it is faster). Decoding stops as soon as the clip is complete, so a long
video costs only its first seconds. A video that cannot be read raises
:class:`VideoDecodeError` with ``reason="unreadable"``; one shorter than the clip, with
``reason="too_short"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DecodedClip", "VideoDecodeError", "decode_clip", "resize_center_crop"]

# Frames resized per call (bounds the float32 buffer of a long, large clip).
_RESIZE_CHUNK = 16


class VideoDecodeError(ValueError):
    """A video that yields no clip. ``reason``: ``"unreadable"`` or ``"too_short"``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass
class DecodedClip:
    frames: np.ndarray  # [num_frames, height, width, 3] uint8
    source_fps: float
    source_width: int
    source_height: int
    source_frames_read: int  # frames decoded before the clip was complete


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale ``frames`` ``[T, H, W, 3]`` uint8 so they cover ``height x width`` (aspect kept),
    then cut the centre: ``[T, height, width, 3]`` uint8 (bilinear, antialiased)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    _, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    # The source region that maps onto the output, centred.
    crop_h = min(h, max(1, round(height / scale)))
    crop_w = min(w, max(1, round(width / scale)))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    region = frames[:, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (height, width):
        return np.ascontiguousarray(region)
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for start in range(0, frames.shape[0], _RESIZE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(region[start : start + _RESIZE_CHUNK]))
        x = chunk.permute(0, 3, 1, 2).to(torch.float32)  # [t, 3, crop_h, crop_w]
        y = F.interpolate(
            x, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )  # [t, 3, height, width]
        y = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # [t, height, width, 3]
        out[start : start + _RESIZE_CHUNK] = y.numpy()
    return out


def _unreadable(path: Path, err: BaseException | str) -> VideoDecodeError:
    detail = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return VideoDecodeError("unreadable", f"{path}: cannot decode ({detail})")


def decode_clip(
    path: str | Path, *, num_frames: int, fps: float, height: int, width: int
) -> DecodedClip:
    """The clip of ``num_frames`` frames at ``fps``, ``height x width``, from the start of
    the video at ``path``. Raises :class:`VideoDecodeError` (a ``ValueError``)."""
    import av

    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError("unreadable", f"{path}: no such file")
    targets = [k / fps for k in range(num_frames)]  # seconds after the first frame
    tol = 1e-6
    chosen: list = [None] * num_frames  # av.VideoFrame per target frame
    k = 0
    read = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _unreadable(path, "no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            src_fps = float(rate) if rate else 0.0
            t0 = None
            prev_t, prev = None, None
            for frame in container.decode(stream):
                if frame.time is not None:
                    t = float(frame.time)
                elif src_fps > 0:
                    t = read / src_fps
                else:
                    raise _unreadable(path, "frames have no timestamps and the rate is unknown")
                read += 1
                if t0 is None:
                    t0 = t
                t -= t0
                if prev is not None:
                    if t <= prev_t:  # out-of-order or duplicate timestamp: keep the first
                        continue
                    # targets nearer to the previous frame (ties go to it) take that frame
                    while k < num_frames and targets[k] <= (prev_t + t) / 2 + tol:
                        chosen[k] = prev
                        k += 1
                    if k == num_frames:
                        break
                prev_t, prev = t, frame
            if prev is None:
                raise _unreadable(path, "no frames")
            width_src, height_src = prev.width, prev.height
            if k < num_frames:  # the last frame is shown for one frame period
                period = 1.0 / src_fps if src_fps > 0 else (prev_t / max(read - 1, 1))
                while k < num_frames and targets[k] < prev_t + period - tol:
                    chosen[k] = prev
                    k += 1
            if k < num_frames:
                have = prev_t + period
                raise VideoDecodeError(
                    "too_short",
                    f"{path}: {read} frames at {src_fps:g} fps ({have:.2f} s) give only {k} of "
                    f"the {num_frames} frames needed at {fps:g} fps "
                    f"({(num_frames - 1) / fps:.2f} s + 1 frame); use a longer video, or lower "
                    "--num-frames / --fps",
                )
            # Convert each distinct source frame once.
            arrays: dict[int, np.ndarray] = {}
            rgb = []
            for frame in chosen:
                key = id(frame)
                if key not in arrays:
                    arrays[key] = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
                rgb.append(arrays[key])
    except VideoDecodeError:
        raise
    except (
        av.error.FFmpegError,
        OSError,
        EOFError,
        RuntimeError,
        ValueError,  # e.g. a pixel format that does not convert to RGB
        IndexError,
        OverflowError,
    ) as err:
        raise _unreadable(path, err) from None
    frames = np.stack(rgb)  # [num_frames, H, W, 3]
    if src_fps <= 0:
        src_fps = (read - 1) / prev_t if prev_t and read > 1 else math.nan
    return DecodedClip(
        frames=resize_center_crop(frames, height, width),
        source_fps=src_fps,
        source_width=int(width_src),
        source_height=int(height_src),
        source_frames_read=read,
    )
