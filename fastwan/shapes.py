"""The one shape rule: the latent grid of a video of a pixel size (torch-free).

Wan's VAE is causal in time: ``F`` frames become ``1 + (F - 1) / st`` latent frames (the
first frame alone, then ``st`` frames per latent frame), and ``H x W`` pixels become
``H / sh x W / sw``. The transformer then patchifies by ``patch_size``; a height or width
must be a multiple of the VAE stride times the patch to give whole tokens.
"""

from __future__ import annotations

from collections.abc import Callable


def _nearest(value: int, multiple: int) -> str:
    lo = max(multiple, value // multiple * multiple)
    hi = -(-value // multiple) * multiple
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def latent_grid(
    num_frames: int,
    height: int,
    width: int,
    vae_stride: tuple[int, int, int],
    patch_size: tuple[int, int, int] = (1, 1, 1),
    name: Callable[[str], str] = str,
) -> tuple[int, int, int]:
    """Latent ``(T, H, W)`` of a ``num_frames x height x width`` video.

    ``vae_stride``: the VAE's ``(temporal, height, width)`` compression; ``patch_size``:
    the transformer's, when the size must also give whole tokens (height and width must
    then be multiples of stride x patch). ``name`` maps a field (``num_frames``,
    ``height``, ``width``) to what the caller calls it (``data.height``, ``--height``) for
    the errors, which give the nearest valid values.
    """
    st, sh, sw = (int(x) for x in vae_stride)
    _, ph, pw = (int(x) for x in patch_size)
    sizes = {"num_frames": num_frames, "height": height, "width": width}
    for field, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name(field)} must be a positive int, got {value!r}")
    for field, value, s, p in (("height", height, sh, ph), ("width", width, sw, pw)):
        multiple = s * p
        if value % multiple:
            why = f"VAE x{s}" + (f" times patch {p}" if p > 1 else "")
            raise ValueError(
                f"{name(field)}={value} is not a multiple of {multiple} ({why}); the nearest "
                f"valid {name(field)}: {_nearest(value, multiple)}"
            )
    if (num_frames - 1) % st:
        lo = (num_frames - 1) // st * st + 1
        raise ValueError(
            f"{name('num_frames')}={num_frames} must be 1 + a multiple of {st} (the VAE "
            f"compresses time {st}x); the nearest valid {name('num_frames')}: {lo} or {lo + st}"
        )
    return (num_frames - 1) // st + 1, height // sh, width // sw
