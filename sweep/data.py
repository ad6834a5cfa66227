"""Data preparation: read chat rows, check them, split them once per study, and mix per trial.

The split is made once, deterministically from the seed, and saved with a content hash in the
study's work dir; every trial of the study (and every worker) reads the same files, so
validation values are comparable and no validation or test row can reach training. Rows are
de-duplicated by content before splitting, and general chat rows equal to a held-out row are
dropped, so a copy of a held-out row cannot leak in through the mix either. A row's ``group``
(``sweep.groups``) stays with the validation and test rows, where metrics are taken per group;
training rows are written as ``messages`` alone, as without groups.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep import atomic, groups
from sweep.spec import DataSpec, SpecError

log = logging.getLogger("sweep")

ROLES = ("system", "user", "assistant")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DataFile:
    """The checked rows of one data file, and where each came from (for messages that point at a row)."""

    path: Path
    rows: list[dict[str, Any]]
    lines: list[int]  # JSONL: the 1-based line of each row; a JSON list: its 0-based index
    jsonl: bool

    def where(self, i: int) -> str:
        """``FILE:LINE`` for a JSONL row, ``FILE[INDEX]`` for an item of a JSON list."""
        return f"{self.path}:{self.lines[i]}" if self.jsonl else f"{self.path}[{self.lines[i]}]"


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Read a JSON list or JSONL file of OpenAI-style ``{"messages": [...]}`` rows and check each row."""
    return read_file(path).rows


def read_file(path: Path) -> DataFile:
    """``load_rows``, keeping each row's line (JSONL) or index (JSON list)."""
    rows, lines, jsonl, where = parse_file(path)
    for row, at in zip(rows, where, strict=False):
        _check_row(row, f"{path}: {at}")
        if row.get(groups.KEY) is not None:
            groups.check_group(row[groups.KEY], f"{path}: {at}")
    return DataFile(path, [_kept(row) for row in rows], lines, jsonl)


def parse_file(path: Path) -> tuple[list[Any], list[int], bool, list[str]]:
    """The raw rows of a JSON list or JSONL file, unchecked: (rows, line or index of each, JSONL?, "line N"/"row N")."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder; expected a JSON or JSONL data file") from None
    except OSError as err:  # a symlink loop, no permission, ...
        raise SpecError(f"{path}: cannot be read as a data file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SpecError(f"{path}: line {line}: not UTF-8 text (byte {err.start})") from None
    stripped = text.lstrip()
    rows: list[Any]
    jsonl = not stripped.startswith("[")
    if not jsonl:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"{path}: line {err.lineno}: malformed JSON: {err.msg}") from None
        lines = list(range(len(rows)))
        where = [f"row {i}" for i in lines]
    else:
        rows, lines = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SpecError(f"{path}: line {lineno}: malformed JSON: {err.msg}") from None
            lines.append(lineno)
        where = [f"line {n}" for n in lines]
    if not rows:
        raise SpecError(f"{path}: no rows")
    return rows, lines, jsonl, where


def _held_out_paths(split: float | Path | dict[str, Path] | None) -> list[Path]:
    return [split] if isinstance(split, Path) else list(split.values()) if isinstance(split, dict) else []


def read_files(spec: DataSpec) -> dict[Path, DataFile]:
    """Every data file the spec names (task, general, and val/test when they are files), read and checked once."""
    if spec.images is not None:  # LLaVA rows: conversation(s) and images (sweep.llava_data)
        from sweep import llava_data

        return llava_data.read_files(spec)
    paths = [spec.task, spec.general, *_held_out_paths(spec.val), *_held_out_paths(spec.test)]
    return {p: read_file(p) for p in dict.fromkeys(paths) if p is not None}


def _kept(row: dict[str, Any]) -> dict[str, Any]:
    """What a row is to the sweep: its messages, and its group when it has one."""
    group = row.get(groups.KEY)
    return {"messages": row["messages"], groups.KEY: group} if group is not None else {"messages": row["messages"]}


#: The splits whose rows keep their group in the study's files (metrics per group); the others train on messages only.
GROUPED_SPLITS = ("val", "test")


def _messages_only(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training rows without their group (a LLaVA row keeps its image and id)."""
    return [{k: v for k, v in row.items() if k != groups.KEY} if groups.KEY in row else row for row in rows]


def load_held_out(
    split: Path | dict[str, Path], name: str, rows_of: Callable[[Path], list[dict[str, Any]]] = load_rows
) -> list[dict[str, Any]]:
    """A held-out split given as a file, or as one file per group (each file's rows get that group)."""
    if isinstance(split, Path):
        return _dedupe(rows_of(split))
    rows = []
    for group, path in split.items():
        for i, row in enumerate(rows_of(path)):
            if row.get(groups.KEY, group) != group:
                raise SpecError(
                    f"{path}: row {i}: has group {row[groups.KEY]!r}, but data.{name} lists this file under {group!r}"
                )
            rows.append({**{k: v for k, v in row.items() if k != groups.KEY}, groups.KEY: group})
    return _dedupe(rows)


def _check_row(row: Any, at: str) -> None:
    if not isinstance(row, dict) or "messages" not in row:
        raise SpecError(f"{at}: expected an object with a 'messages' list")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise SpecError(f"{at}: 'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise SpecError(f"{at}: messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise SpecError(f"{at}: messages[{i}].role is {role!r}; expected one of {list(ROLES)}")
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            raise SpecError(f"{at}: messages[{i}].content is empty; expected text")
    if not any(m["role"] == "assistant" for m in messages):
        raise SpecError(f"{at}: no assistant turn; a row needs at least one answer to learn from")


def row_key(row: dict[str, Any]) -> str:
    """Content identity of a row: equal conversations (about the same picture, for a LLaVA row) have equal keys."""
    content = row["messages"] if row.get("image") is None else [row["messages"], row["image"]]
    canon = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for row in rows:
        key = row_key(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _take_fraction(rows: list[dict[str, Any]], fraction: float, rng: random.Random, name: str, path: Path):
    order = list(range(len(rows)))
    rng.shuffle(order)
    n = max(1, round(len(rows) * fraction))
    if n >= len(rows):
        raise SpecError(f"{path}: {len(rows)} rows are too few to hold out a {name} fraction of {fraction}")
    held = [rows[i] for i in sorted(order[:n])]
    rest = [rows[i] for i in sorted(order[n:])]
    return held, rest


@dataclass(frozen=True)
class PreparedData:
    """The study's data, as files in its work dir, and the hash that identifies them."""

    folder: Path
    counts: dict[str, int]
    hashes: dict[str, str]
    digest: str
    groups: dict[str, list[str]] = field(default_factory=dict)  # by split: the groups its rows carry (val, test)

    def path(self, split: str) -> Path:
        return self.folder / f"{split}.jsonl"


def split_rows(spec: DataSpec, files: dict[Path, DataFile] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Check every data file and return the splits, in memory; nothing is written.

    ``files`` are the spec's files already read (``read_files``); the splits then hold those same row
    objects, so a row of a split can be traced back to its file and line.
    """

    def rows_of(path: Path) -> list[dict[str, Any]]:
        return files[path].rows if files is not None and path in files else read_file(path).rows

    rng = random.Random(spec.seed)
    task = _dedupe(rows_of(spec.task))
    if isinstance(spec.val, float):
        val, task = _take_fraction(task, spec.val, rng, "val", spec.task)
    else:
        val = load_held_out(spec.val, "val", rows_of)
    if spec.test is None:
        test: list[dict[str, Any]] = []
    elif isinstance(spec.test, float):
        test, task = _take_fraction(task, spec.test, rng, "test", spec.task)
    else:
        test = load_held_out(spec.test, "test", rows_of)
    held_keys = {row_key(r) for r in val + test}
    overlap = [i for i, r in enumerate(task) if row_key(r) in held_keys]
    if overlap:
        raise SpecError(
            f"{spec.task}: {len(overlap)} training row(s) also appear in the validation or test set "
            f"(first at row {overlap[0]}); held-out rows must not be trained on"
        )
    if not task:
        raise SpecError(f"{spec.task}: no training rows left after holding out validation and test rows")
    general_train: list[dict[str, Any]] = []
    general_val: list[dict[str, Any]] = []
    if spec.general is not None:
        general = [r for r in _dedupe(rows_of(spec.general)) if row_key(r) not in held_keys]
        if spec.general_val > 0 and len(general) > 1:
            general_val, general_train = _take_fraction(general, spec.general_val, rng, "general_val", spec.general)
        else:
            general_train = general
    # training rows keep their group here (and stay the objects of ``files``); ``prepare`` writes them without it
    return {"train": task, "val": val, "test": test, "general_train": general_train, "general_val": general_val}


def prepare(spec: DataSpec, folder: Path) -> PreparedData:
    """Write the study's splits once; on later calls check the saved files still match the spec's data.

    Many workers (threads, processes, containers where each is PID 1) may call this on one folder at
    once. Each writes into its own temporary folder beside ``folder`` and renames it into place; the
    first rename wins and the others read the winner's files. Saved files are checked against the
    manifest's hashes whenever they are read, so a changed or truncated split is never trusted.
    """
    splits = split_rows(spec, read_files(spec))
    splits = {name: rows if name in GROUPED_SPLITS else _messages_only(rows) for name, rows in splits.items()}
    lines = {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in splits.items()}
    hashes = {name: _sha256(text.encode("utf-8")) for name, text in lines.items()}
    digest = _digest(hashes)
    counts = {name: len(rows) for name, rows in splits.items()}
    manifest = json.dumps({"digest": digest, "hashes": hashes, "counts": counts, "seed": spec.seed}, indent=2)
    made = PreparedData(folder, counts, hashes, digest, {name: groups.names(splits[name]) for name in ("val", "test")})
    if not folder.exists():
        tmp = atomic.temp_dir_beside(folder)
        try:
            for name, text in lines.items():
                (tmp / f"{name}.jsonl").write_text(text, encoding="utf-8")
            (tmp / MANIFEST).write_text(manifest, encoding="utf-8")  # last: a folder with it is complete
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if atomic.publish_dir(tmp, folder):
            return made
        # another worker's folder won the rename: check it like any saved split
    return _check_saved(made, lines, manifest)


def _check_saved(made: PreparedData, lines: dict[str, str], manifest: str) -> PreparedData:
    """Use a saved split after checking its manifest and every file's hash; repair what the spec's data can remake.

    ``made`` and ``lines`` are the split this spec's data makes. A split file is written again only
    where a hash proves what it must hold (the manifest's, equal to ours, or ours when the manifest
    is missing and the file is too), so a repair writes exactly the bytes the first worker wrote.
    """
    folder = made.folder
    if not folder.is_dir():
        raise SpecError(
            f"{folder}: exists but is not a folder; expected the study's data split. Remove it and run again"
        )
    path = folder / MANIFEST
    saved = _read_manifest(path)
    if saved is not None and saved["digest"] != made.digest:
        raise SpecError(
            f"{path}: the study's data split was made from other data (hash {saved['digest']}, "
            f"now {made.digest}); use a new study name or restore the original data files"
        )
    repaired, foreign = [], []
    for name, text in lines.items():
        file = folder / f"{name}.jsonl"
        try:
            found = _sha256(file.read_bytes())
        except FileNotFoundError:
            found = None
        if found == made.hashes[name]:
            continue
        if found is not None and saved is None:
            foreign.append(file.name)  # no manifest vouches for ours being what was meant: do not overwrite
            continue
        atomic.write_text(file, text)
        repaired.append(file.name)
    if foreign:
        raise SpecError(
            f"{folder}: has no valid {MANIFEST} (a split that was never finished) and {', '.join(foreign)} "
            f"differ(s) from the split this spec's data makes; move the folder away or delete it (rm -r {folder}) "
            "to have it made again, or use a new study name"
        )
    if saved is None:
        atomic.write_text(path, manifest)
        log.warning("%s: had no valid %s; checked its files, wrote %s and the manifest", folder, MANIFEST,
                    ", ".join(repaired) or "nothing else")  # fmt: skip
    elif repaired:
        log.warning("%s: %s did not match the hashes in %s (changed or cut short); written again from the data",
                    folder, ", ".join(repaired), MANIFEST)  # fmt: skip
    return made


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The saved manifest if it is whole and self-consistent (its digest is that of its hashes), else None."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: not valid JSON; treated as missing", path)
        return None
    if not (isinstance(saved, dict) and isinstance(saved.get("hashes"), dict) and isinstance(saved.get("digest"), str)):
        log.warning("%s: expected digest and hashes; treated as missing", path)
        return None
    if _digest(saved["hashes"]) != saved["digest"]:
        log.warning("%s: its digest is not that of its hashes; treated as missing", path)
        return None
    return saved


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def mix(data: PreparedData, mix_ratio: float, seed: int, out: Path, source: Path | None = None) -> int:
    """Write a trial's training file: the task rows plus a share of general chat rows.

    ``mix_ratio`` is the general rows' share of the mixed set, so 0.2 means one general row for
    every four task rows, capped by how many general rows there are. Returns the row count.
    ``source`` is a folder of the same splits already tokenized (``sweep.xtuner.tokenized``).
    """
    folder = source or data.folder
    task = (folder / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    general = (folder / "general_train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    if not 0.0 <= mix_ratio < 1.0:
        raise SpecError(f"mix_ratio must be in [0, 1), got {mix_ratio}")
    if mix_ratio > 0 and not general:
        raise SpecError("mix_ratio > 0 but the spec has no data.general file to mix in")
    want = round(len(task) * mix_ratio / (1.0 - mix_ratio))
    rng = random.Random(seed)
    chosen = rng.sample(general, min(want, len(general)))
    rows = task + chosen
    rng.shuffle(rows)
    out.write_text("".join(rows), encoding="utf-8")
    return len(rows)


REFERENCE = "data.json"  # in a trial dir: what its copies of the training rows were made from


def write_reference(work: Path, data: PreparedData, mix_ratio: float, seed: int, copies: dict[str, Path]) -> None:
    """Record, in ``work/data.json``, how the trial's copies of its training rows were made.

    ``copies`` maps each file in ``work`` written by `mix` to the ``source`` folder it was mixed from
    (the split itself, or its tokens). With the split's digest and each copy's sha256 this lets a
    trial that is not kept drop its copies (`drop_copies`) and anyone make them again (`remake`).
    """
    entries = {
        name: {"source": str(source), "sha256": file_sha256(work / name), "rows": _count_lines(work / name)}
        for name, source in copies.items()
    }
    reference = {
        "data": str(data.folder), "data_digest": data.digest, "mix_ratio": mix_ratio, "seed": seed, "copies": entries,
        "remake": f"python -c \"from sweep.data import remake; remake('{work}')\"",
    }  # fmt: skip
    atomic.write_text(work / REFERENCE, json.dumps(reference, indent=1))


def drop_copies(work: Path) -> list[str]:
    """Delete the trial's copies of its training rows where digests prove `remake` gives them back.

    A copy goes only if ``data.json`` names it, its sha256 is the one recorded, and the study's
    split still has the digest the copy was mixed from (its manifest, checked file by file when the
    split is read). Anything else stays. Returns the names deleted.
    """
    reference = _read_reference(work)
    if reference is None or saved_digest(Path(reference["data"])) != reference["data_digest"]:
        return []
    dropped = []
    for name, entry in reference["copies"].items():
        path = work / name
        if path.is_file() and file_sha256(path) == entry["sha256"]:
            path.unlink(missing_ok=True)  # another thread may thin the same trial out at once
            dropped.append(name)
    return dropped


def remake(work: Path | str) -> list[Path]:
    """Write a trial's dropped copies of its training rows again, byte for byte, from the study's split."""
    work = Path(work)
    path = work / REFERENCE
    reference = _read_reference(work)
    if reference is None:
        raise SpecError(f"{path}: not found or not valid; expected the reference a trial writes beside its config")
    folder, digest = Path(reference["data"]), reference["data_digest"]
    if saved_digest(folder) != digest:
        raise SpecError(f"{folder}: is not the split with digest {digest} that {path} names; its rows cannot be remade")
    made = []
    for name, entry in reference["copies"].items():
        out = work / name
        if out.exists():
            continue
        source = Path(entry["source"])
        if not (source / "train.jsonl").is_file():
            raise SpecError(f"{source}: not found; `sweep run` of the study makes its tokens again, then run remake")
        data = PreparedData(folder, {}, {}, digest)
        mix(data, reference["mix_ratio"], reference["seed"], out, None if source == folder else source)
        if file_sha256(out) != entry["sha256"]:
            out.unlink()
            raise SpecError(f"{out}: remade with sha256 other than {entry['sha256']} recorded in {path}; removed")
        made.append(out)
    return made


def saved_digest(folder: Path) -> str | None:
    """The digest in a split's manifest, or None when it has no valid one."""
    saved = _read_manifest(folder / MANIFEST)
    return saved["digest"] if saved is not None else None


def _read_reference(work: Path) -> dict[str, Any] | None:
    try:
        reference = json.loads((work / REFERENCE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    keys = ("data", "data_digest", "mix_ratio", "seed", "copies")
    return reference if isinstance(reference, dict) and all(k in reference for k in keys) else None


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (token files can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)
