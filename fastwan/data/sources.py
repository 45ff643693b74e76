"""Inputs of the data commands: caption files (videos + captions) and prompt files.

Caption files (``--captions``) map video files, relative to ``--videos``, to captions:

* JSON: a list of objects, or an object ``{"video.mp4": "caption", ...}``;
* JSON Lines: one object per line;
* CSV: a header row and one row per video.

An object names its video with one of :data:`VIDEO_KEYS` and its caption with one of
:data:`CAPTION_KEYS` (FastVideo's ``videos2caption.json`` uses ``path`` and ``cap``). A
caption may be a list of captions: one row per caption, sharing the video's latents.

Prompt files (``--prompts``): ``.txt`` (one prompt a line, ``#`` lines skipped), or JSON /
JSON Lines / CSV holding strings or objects with a prompt (one of :data:`CAPTION_KEYS`) and
an optional ``id``.

Image + prompt files (``--prompts`` with ``--task i2v``: data-free image-to-video and
image-to-video synthesis): JSON Lines, JSON (a list of objects) or CSV (a header row), one
object / row per pair, naming its image with one of :data:`IMAGE_KEYS` and its prompt
with one of :data:`CAPTION_KEYS`, with an optional ``id``::

    {"image": "cats/001.png", "prompt": "The cat turns its head and walks away."}

Image paths are relative to ``--images`` (default: the file's own folder) or absolute.
Every image is checked when the file is read (it exists, and its header decodes): a bad
one is an error naming the line, the field and the fix, before any model loads.

Row ids are stable across runs (resuming relies on them): a video's relative path (with
``#k`` for its k-th caption when it has several); a prompt's given id, else ``p-`` and a
hash of its text (``~n`` added for the n-th repeat of the same text); an image + prompt
pair's given id, else ``p-`` and a hash of the image path (as written) and the prompt.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "CAPTION_KEYS",
    "IMAGE_KEYS",
    "VIDEO_KEYS",
    "PromptItem",
    "VideoItem",
    "load_captions",
    "load_image_prompts",
    "load_prompts",
]

VIDEO_KEYS = ("path", "video", "file_name", "filename", "file", "video_path", "name")
CAPTION_KEYS = ("caption", "cap", "text", "prompt", "captions")
IMAGE_KEYS = ("image", "image_path", "first_frame", "path")  # path: {"a.png": "prompt"}


@dataclass
class VideoItem:
    """A video and its captions; ``ids[i]`` is the row id of ``captions[i]``."""

    path: Path  # absolute file
    file_name: str  # path relative to the videos folder (posix)
    captions: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


@dataclass
class PromptItem:
    """A prompt; for image-to-video, with its conditioning image."""

    id: str
    prompt: str
    image: Path | None = None  # absolute image file (image + prompt files only)
    image_name: str | None = None  # the image path as the file wrote it
    where: str = ""  # "file: line n", for messages


def _records(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs of a JSON / JSON Lines / CSV file."""
    if not path.is_file():
        raise ValueError(f"{what} file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if isinstance(data, dict):
            for key, value in data.items():
                yield f"{path}: key {key!r}", {"path": key, "caption": value}
        elif isinstance(data, list):
            for i, item in enumerate(data):
                yield f"{path}: entry {i}", item
        else:
            raise ValueError(f"{path}: JSON must be a list or an object, got {type(data).__name__}")
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}: line {n}", json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {n} is not valid JSON ({err})") from None
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise ValueError(f"{path}: CSV needs a header row")
        for n, row in enumerate(reader, start=2):
            yield f"{path}: line {n}", {k.strip().lower(): v for k, v in row.items() if k}
    else:
        raise ValueError(
            f"{what} file {str(path)!r} must end in .json, .jsonl or .csv"
            + (" (or .txt)" if what == "prompts" else "")
        )


def _pick(record: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if record.get(key) is not None:
            return key, record[key]
    return None, None


def _captions_of(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where}: a caption must be a string or a list of strings, got {value!r}")


def load_captions(captions_file: str | Path, videos_dir: str | Path) -> list[VideoItem]:
    """The videos named in ``captions_file`` (in file order) with their captions.

    A video named twice gets both captions. Files that do not exist are kept (the
    preprocessing reports them as skipped); paths may not leave ``videos_dir``.
    """
    captions_file, videos_dir = Path(captions_file), Path(videos_dir)
    if not videos_dir.is_dir():
        raise ValueError(f"--videos folder {str(videos_dir)!r} does not exist")
    items: dict[str, VideoItem] = {}
    for where, record in _records(captions_file, "captions"):
        if not isinstance(record, dict):
            raise ValueError(
                f"{where}: expected an object with a video ({'/'.join(VIDEO_KEYS)}) and a "
                f"caption ({'/'.join(CAPTION_KEYS)}), got {record!r}"
            )
        vkey, video = _pick(record, VIDEO_KEYS)
        ckey, caption = _pick(record, CAPTION_KEYS)
        if vkey is None or not str(video).strip():
            raise ValueError(
                f"{where}: no video file; name it with one of the keys {list(VIDEO_KEYS)}"
            )
        if ckey is None:
            raise ValueError(f"{where}: no caption; give one with one of {list(CAPTION_KEYS)}")
        rel = PurePosixPath(str(video).replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(
                f"{where}: video path {str(video)!r} must be relative to --videos, inside it"
            )
        key = rel.as_posix()
        item = items.setdefault(key, VideoItem(path=videos_dir / key, file_name=key))
        item.captions += _captions_of(caption, where)
    if not items:
        raise ValueError(f"captions file {str(captions_file)!r} names no video")
    for key, item in items.items():
        many = len(item.captions) > 1
        item.ids = [f"{key}#{i}" if many else key for i in range(len(item.captions))]
    return list(items.values())


def _hash_id(prompt: str) -> str:
    return "p-" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def load_prompts(prompts_file: str | Path) -> list[PromptItem]:
    """The prompts of a ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` file, with stable ids."""
    path = Path(prompts_file)
    raw: list[tuple[str, str | None, Any]] = []  # (where, id, prompt)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise ValueError(f"prompts file {str(path)!r} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                raw.append((f"{path}: line {n}", None, line.strip()))
    else:
        for where, record in _records(path, "prompts"):
            if isinstance(record, str):
                raw.append((where, None, record))
            elif isinstance(record, dict):
                key, prompt = _pick(record, CAPTION_KEYS)
                if key is None:
                    raise ValueError(f"{where}: no prompt; give one with one of {CAPTION_KEYS}")
                given = record.get("id")
                raw.append((where, None if given in (None, "") else str(given), prompt))
            else:
                raise ValueError(f"{where}: expected a prompt string or object, got {record!r}")
    items: list[PromptItem] = []
    seen: dict[str, int] = {}
    used: dict[str, str] = {}
    for where, given, prompt in raw:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: the prompt must be a non-empty string, got {prompt!r}")
        prompt = prompt.strip()
        if given is None:
            base = _hash_id(prompt)
            seen[base] = seen.get(base, 0) + 1
            row_id = base if seen[base] == 1 else f"{base}~{seen[base]}"
        else:
            row_id = given
        if row_id in used:
            raise ValueError(
                f"{where}: id {row_id!r} is also used at {used[row_id]}; ids must be unique"
            )
        used[row_id] = where
        items.append(PromptItem(id=row_id, prompt=prompt))
    if not items:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt")
    return items


def _check_image(path: Path, where: str, base: Path, key: str) -> None:
    """The image exists and its header decodes (a ValueError naming line, field and fix)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(
            f"{where}: field {key!r}: image {str(path)!r} does not exist; fix the path "
            f"(relative paths are read from {str(base)!r}: pass --images DIR for another "
            "folder) or remove the line"
        )
    try:
        with Image.open(path) as img:
            img.verify()  # reads the header (and PNG checksums) without decoding the pixels
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ValueError(
            f"{where}: field {key!r}: {str(path)!r} is not a readable image "
            f"({type(err).__name__}: {err}); replace it with a PNG / JPEG / WebP file or "
            "remove the line"
        ) from None


def load_image_prompts(
    prompts_file: str | Path, images_dir: str | Path | None = None
) -> list[PromptItem]:
    """The image + prompt pairs of a ``.jsonl`` / ``.json`` / ``.csv`` file (see the module
    docstring), with stable ids; every image checked (exists, readable)."""
    path = Path(prompts_file)
    if path.suffix.lower() == ".txt":
        raise ValueError(
            f"{str(path)!r}: image-to-video prompts need an image per prompt: write a .jsonl "
            'file of {"image": "a.png", "prompt": "..."} lines (or .json / .csv with image '
            "and prompt columns)"
        )
    base = Path(images_dir) if images_dir is not None else path.parent
    if images_dir is not None and not base.is_dir():
        raise ValueError(f"--images folder {str(base)!r} does not exist")
    items: list[PromptItem] = []
    used: dict[str, str] = {}
    seen: dict[str, int] = {}
    for where, record in _records(path, "prompts"):
        if not isinstance(record, dict):
            raise ValueError(
                f"{where}: expected an object with an image ({'/'.join(IMAGE_KEYS)}) and a "
                f"prompt ({'/'.join(CAPTION_KEYS)}), got {record!r}"
            )
        ikey, image = _pick(record, IMAGE_KEYS)
        pkey, prompt = _pick(record, CAPTION_KEYS)
        if ikey is None or not isinstance(image, str) or not image.strip():
            raise ValueError(
                f"{where}: field 'image': no image file; name it with one of the keys "
                f"{list(IMAGE_KEYS)} (a path relative to --images, or absolute)"
            )
        if pkey is None or not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"{where}: field 'prompt': no prompt; give a non-empty string with one of "
                f"{list(CAPTION_KEYS)}"
            )
        image, prompt = image.strip(), prompt.strip()
        file = Path(image).expanduser()
        file = file if file.is_absolute() else base / file
        _check_image(file, where, base, ikey)
        given = record.get("id")
        if given in (None, ""):
            key = _hash_id(f"{image}\n{prompt}")
            seen[key] = seen.get(key, 0) + 1
            row_id = key if seen[key] == 1 else f"{key}~{seen[key]}"
        else:
            row_id = str(given)
        if row_id in used:
            raise ValueError(
                f"{where}: id {row_id!r} is also used at {used[row_id]}; ids must be unique"
            )
        used[row_id] = where
        items.append(
            PromptItem(id=row_id, prompt=prompt, image=file, image_name=image, where=where)
        )
    if not items:
        raise ValueError(f"prompts file {str(path)!r} holds no image + prompt pair")
    return items
