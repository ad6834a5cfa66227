"""LLaVA data: rows of a JSON list (or JSONL) about pictures in an image folder, checked before anything is created.

A row is the tutorial's ``{"id", "image", "conversation": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", ...}]}``; XTuner's own data spells the key ``conversations``, and both are read. Each row becomes
the sweep's chat row (``messages``, as ``sweep.data`` splits, de-duplicates and mixes them) plus its picture's
absolute path (``image``) and its ``id``: the rest of the study (the hashed split, the mix, validation and the test
gate) is the chat path's, and a LLaVA row is one question about one picture (``data.row_key`` counts the
picture). A row without ``image`` is text-only (a second, general set may be all text).

Every picture is opened here, so a missing or unreadable file, a row that names a picture but never says
``<image>`` (or says it with no picture) and a missing image folder are errors naming the file and the row, before
a study, a run or a work dir exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweep import groups
from sweep.data import DataFile, parse_file
from sweep.errors import SpecError
from sweep.spec import DataSpec

IMAGE_TOKEN = "<image>"  # xtuner.utils.DEFAULT_IMAGE_TOKEN
TURN_KEYS = ("conversation", "conversations")  # the tutorial's key, and XTuner's llava_map_fn's
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def read_files(spec: DataSpec) -> dict[Path, DataFile]:
    """Every data file of a LLaVA spec, read and checked once: task, val/test files (``data.images``) and the
    general set (``data.general_images``, default ``data.images``)."""
    from sweep.data import _held_out_paths

    images = _folder(spec.images, "data.images")
    general_images = _folder(spec.general_images, "data.general_images") if spec.general_images else images
    paths = [spec.task, *_held_out_paths(spec.val), *_held_out_paths(spec.test)]
    files = {p: read_file(p, images) for p in dict.fromkeys(paths)}
    if spec.general is not None and spec.general not in files:
        files[spec.general] = read_file(spec.general, general_images)
    return files


def _folder(path: Path | None, key: str) -> Path:
    if path is None or not path.is_dir():
        raise SpecError(f"{key}: image folder {path} does not exist (or is not a folder)")
    return path


def read_file(path: Path, images: Path | None) -> DataFile:
    """The rows of one LLaVA data file as chat rows with their picture; the first bad row is an error naming it."""
    rows, lines, jsonl, where = parse_file(path)
    kept = [_row(row, f"{path}: {at}", images, i, path) for i, (row, at) in enumerate(zip(rows, where, strict=True))]
    return DataFile(path, kept, lines, jsonl)


def _row(row: Any, at: str, images: Path | None, index: int, path: Path) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise SpecError(f"{at}: expected an object with 'conversation' (or 'conversations') and 'image'")
    given = [k for k in TURN_KEYS if k in row]
    if len(given) != 1:
        raise SpecError(f"{at}: expected one of 'conversation' or 'conversations' (a list of from/value turns), "
                        f"found {given or 'neither'}")  # fmt: skip
    turns = row[given[0]]
    if not isinstance(turns, list) or not turns:
        raise SpecError(f"{at}: '{given[0]}' must be a non-empty list of {{'from', 'value'}} turns")
    messages = []
    for i, turn in enumerate(turns):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise SpecError(f"{at}: {given[0]}[{i}].from is {turn.get('from') if isinstance(turn, dict) else turn!r}; "
                            f"expected one of {list(ROLES)}")  # fmt: skip
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{at}: {given[0]}[{i}].value is empty; expected text")
        messages.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise SpecError(f"{at}: no 'gpt' turn; a row needs at least one answer to learn from")
    said = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] == "user")
    image = row.get("image")
    kept: dict[str, Any] = {"messages": messages}
    if image is None:
        if said:
            raise SpecError(f"{at}: says {IMAGE_TOKEN} but names no 'image'")
    else:
        if said != 1:
            raise SpecError(f"{at}: image {image!r} needs exactly one {IMAGE_TOKEN} in the human turns "
                            f"(where the picture goes), found {said}")  # fmt: skip
        kept["image"] = str(check_image(image, images, at))
    kept["id"] = str(row.get("id", f"{path.stem}-{index}"))
    if row.get(groups.KEY) is not None:
        groups.check_group(row[groups.KEY], at)
        kept[groups.KEY] = row[groups.KEY]
    return kept


def check_image(name: Any, folder: Path | None, at: str) -> Path:
    """The picture's absolute path, after opening it; an error naming it (and ``at``) when it cannot be used."""
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"{at}: 'image' must be a file name in the image folder, got {name!r}")
    if folder is None:
        raise SpecError(f"{at}: names image {name!r}, but no image folder is set for this file (data.images)")
    path = (folder / name).resolve()
    if not path.is_file():
        raise SpecError(f"{at}: image {path} not found")
    try:
        from PIL import Image

        with Image.open(path) as picture:
            picture.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds; any of them means unusable
        raise SpecError(f"{at}: image {path} cannot be read as a picture ({type(err).__name__}: {err})") from None
    return path
