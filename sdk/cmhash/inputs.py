"""Collections to encode: a folder, a file list or a manifest, read into numbered records.

Used by ``cmhash encode`` and by the export's verification (``--verify-data``), so both read
a collection the same way.

- **folder**: for images, every image file under it (by suffix, recursively, sorted by
  relative path); for texts, every ``.txt`` file, whose whole content is one text.
- **manifest** (``.jsonl`` / ``.ndjson`` / ``.json`` lines, or ``.csv`` with a header): one
  record per line with ``image`` (a path, relative to the manifest's folder), ``text``
  and/or ``tags`` (words, or column indices of the vocabulary), ``labels`` (names or
  indices) and an optional ``id``. CSV cells separate several tags or labels with ``|``.
  :func:`read_manifest` is the one reader of manifests: training's loader uses it too.
- **file list** (any other file): one entry per line, blank lines skipped; for images a path
  (relative to the list's folder), for texts the line itself.

Record ``number`` is the position in the whole collection (0, 1, ...): the id the codes
get, stable across shards and resumes. ``name`` is what the user knows the item by (its
path, the manifest's ``id`` or the line number).

:func:`iter_collection` yields the records one at a time (``cmhash encode`` streams its
input, holding a chunk of records at most); :func:`read_collection` lists them.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import EncodeJobError, InvalidArgumentError, TextInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
LIST_SEPARATOR = "|"


@dataclass(frozen=True, slots=True)  # slots: a collection holds one per item
class Record:
    number: int  # position in the collection: the code's id
    name: str  # path, manifest id or line number, for the user
    image: Path | bytes | None = None  # a path, or the encoded image itself (engines that read bytes)
    text: str | None = None
    tags: tuple = ()
    labels: tuple[str, ...] | None = None
    problem: str | None = None  # why this record cannot be used (listed, not raised)
    where: str | None = None  # "manifest.jsonl:3" for a manifest row, for messages

    @property
    def has_text(self) -> bool:
        return self.text is not None or bool(self.tags)


def collection_kind(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise EncodeJobError(f"input not found: {path}")
    if not path.is_file():  # a FIFO or a device: reading it could block forever
        raise EncodeJobError(f"{path} is not a folder or a regular file; give a folder, a file list or a manifest")
    return "manifest" if path.suffix.lower() in MANIFEST_SUFFIXES else "list"


def iter_collection(path: str | os.PathLike, modality: str = "image", *, read_texts: bool = True) -> Iterator[Record]:
    """The records of a folder, file list or manifest (see the module docstring), one at a
    time: a folder is walked one directory at a time, a list or manifest read a line at a
    time, a folder's text read when its record is made. ``read_texts=False`` leaves a
    folder's ``.txt`` files unread (their records have no text): for a pass that needs only
    numbers, names and paths.

    An input with nothing of ``modality`` (or a file list of texts given as images) raises
    :class:`EncodeJobError` when the iteration reaches its end."""
    if modality not in ("image", "text"):
        raise InvalidArgumentError(f"modality must be 'image' or 'text', got {modality!r}")
    path = Path(path)
    kind = collection_kind(path)
    if kind == "folder":
        records = _folder_records(path, modality, read_texts)
    elif kind == "manifest":
        records = iter_manifest(path)
    else:
        records = _list_records(path, modality)
    return _checked(records, path, kind, modality)


def read_collection(path: str | os.PathLike, modality: str = "image") -> list[Record]:
    """All the records of :func:`iter_collection`, as a list."""
    return list(iter_collection(path, modality))


def _checked(records: Iterator[Record], path: Path, kind: str, modality: str) -> Iterator[Record]:
    """``records``, then an :class:`EncodeJobError` if they were none, or a file list of
    texts read as images (known only once every line is seen)."""
    count = 0
    images_named = kind != "list" or modality != "image"
    for record in records:
        images_named = images_named or _names_image(record.image)
        count += 1
        yield record
    if not count:
        raise EncodeJobError(f"{path} holds no {'images' if modality == 'image' else 'texts'} to encode"
                             + _other_modality_hint(path, kind, modality))
    if not images_named:
        raise EncodeJobError(f"{path} looks like a list of texts, not of images (no line names an image file); "
                             "encode it with --modality text (modality='text')")


def _names_image(path: Path) -> bool:
    """Whether a file list's line can be an image: an image suffix, or an existing file."""
    return path.suffix.lower() in IMAGE_SUFFIXES or path.is_file()


def _other_modality_hint(path: Path, kind: str, modality: str) -> str:
    """For an input with nothing of ``modality``: the option meant, when it holds the other kind."""
    if kind != "folder":
        return ""
    other = "text" if modality == "image" else "image"
    suffixes = (".txt",) if other == "text" else IMAGE_SUFFIXES
    if any(p.suffix.lower() in suffixes and p.is_file() for p in path.rglob("*")):
        what = ".txt files" if other == "text" else "images"
        return f"; it holds {what}: encode them with --modality {other} (modality='{other}')"
    return ""


def _folder_files(folder: Path, suffixes: tuple[str, ...], prefix: str = "") -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of the files under ``folder`` with one of ``suffixes``, in
    the order of their sorted relative paths, holding one directory's entries per level.

    A directory sorts as its name plus "/", which is where all of its paths sort among its
    siblings ("a-b" < "a/b" < "a0"). Like ``Path.rglob``: symbolic links to directories are
    not followed, an unreadable directory is skipped, hidden files are included."""
    entries = []
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    entries.append(entry.name + "/")
                elif Path(entry.name).suffix.lower() in suffixes:
                    entries.append(entry.name)
    except PermissionError:
        return
    entries.sort()
    for key in entries:
        name = key.rstrip("/")
        path = folder / name
        if key.endswith("/"):
            yield from _folder_files(path, suffixes, prefix + key)
        elif not path.is_dir():  # a link to a directory is not an item
            yield prefix + name, path


def _folder_records(root: Path, modality: str, read_texts: bool) -> Iterator[Record]:
    suffixes = IMAGE_SUFFIXES if modality == "image" else (".txt",)
    for number, (name, p) in enumerate(_folder_files(root, suffixes)):
        if modality == "image":
            yield Record(number, name, image=p)
        elif not p.is_file():  # a FIFO, socket or device: reading it could block forever
            yield Record(number, name, problem="not a regular file (a FIFO, socket or device); skipped")
        elif not read_texts:
            yield Record(number, name)
        else:
            try:
                yield Record(number, name, text=p.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield Record(number, name, problem=f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            except OSError as exc:
                yield Record(number, name, problem=f"cannot be read: {exc.strerror or exc}")


def _lines(path: Path, what: str) -> Iterator[str]:
    """The lines of a UTF-8 file, cut as ``str.splitlines`` cuts the whole text, read a line
    at a time (a UTF-8 character never holds the byte of "\\n")."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EncodeJobError(f"{path}: the {what} is not UTF-8 text (line {lineno}: {exc}); "
                                     "convert it to UTF-8") from None
            yield from text.splitlines()


def _list_records(path: Path, modality: str) -> Iterator[Record]:
    number = 0
    for lineno, line in enumerate(_lines(path, "file list"), 1):
        entry = line.strip()
        if not entry:
            continue
        if modality == "image":
            yield Record(number, entry, image=_resolve(path.parent, entry))
        else:
            yield Record(number, f"line {lineno}", text=line)
        number += 1


def _resolve(root: Path, entry: str) -> Path:
    p = Path(entry).expanduser()
    return p if p.is_absolute() else root / p


def read_manifest(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Record]:
    """The records of a manifest, in order, one per row: the one reader of manifests, for
    ``cmhash encode``, the export's verification and training. Image paths are relative to
    ``image_root`` (default: the manifest's folder). A row that cannot be read (bad JSON,
    a field of the wrong type) keeps its ``problem``; each caller decides whether that skips
    the row or stops."""
    return list(iter_manifest(path, image_root))


def iter_manifest(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Iterator[Record]:
    """:func:`read_manifest`'s records, a row at a time."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    for number, (lineno, rec) in enumerate(_manifest_rows(path)):
        yield _manifest_record(number, f"{path.name}:{lineno}", rec, root)


def _manifest_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row): CSV (suffix ``.csv``, a header row; ``tags`` and
    ``labels`` cells hold several values separated by ``|``) or JSONL (anything else, one
    JSON object per non-empty line). A JSONL line that does not parse stands as its problem,
    a string."""
    lines = _lines(path, "manifest")
    if path.suffix.lower() == ".csv":
        for lineno, row in enumerate(csv.DictReader(lines), 2):
            rec: dict = {k.strip(): v for k, v in row.items() if k is not None}
            for key in ("tags", "labels"):
                if key in rec:
                    rec[key] = [s.strip() for s in (rec[key] or "").split(LIST_SEPARATOR) if s.strip()]
            yield lineno, rec
    else:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, f"not valid JSON ({exc.msg})"


def _manifest_record(number: int, where: str, rec: Any, root: Path) -> Record:
    if not isinstance(rec, dict):
        return Record(number, where, problem=rec if isinstance(rec, str) else "each line must be a JSON object",
                      where=where)
    name = str(rec["id"]) if rec.get("id") not in (None, "") else (str(rec.get("image")) if rec.get("image") else where)
    problems = []
    image = _resolve(root, str(rec["image"])) if rec.get("image") else None
    text = rec.get("text")
    if text is not None and not isinstance(text, str):
        problems.append("'text' must be a string")
        text = None
    tags = rec.get("tags") or []
    if not isinstance(tags, list):
        problems.append("'tags' must be a list")
        tags = []
    labels = rec.get("labels")
    if labels is not None:
        labels = tuple(str(x) for x in (labels if isinstance(labels, list) else [labels]))
    return Record(number, name, image=image, text=text, tags=tuple(tags), labels=labels,
                  problem="; ".join(problems) or None, where=where)


def is_index(x: Any) -> bool:
    """Whether a manifest's tag or label is a column index (an int, or a string of ASCII
    digits, possibly negative so that it is reported as out of range rather than read as a
    word). Other digit characters ('²', '٣') are words: ``int()`` would refuse or misread them."""
    if isinstance(x, str):
        digits = x.strip().removeprefix("-")
        return digits.isascii() and digits.isdecimal()
    return isinstance(x, int) and not isinstance(x, bool)


def text_input(record: Record, vocabulary, dim: int):
    """What :meth:`Encoder.hash_texts` takes for a record, built as training builds it: the
    text and the tags as one tag list (``[text, *tags]``), or a BoW vector when the tags are
    column indices. Raises :class:`TextInputError` when there is no text to take."""
    if not record.has_text:
        raise TextInputError("the record has no 'text' or 'tags'")
    tags: Sequence = record.tags
    if tags and all(is_index(t) for t in tags):
        if record.text:
            raise TextInputError("a record cannot mix a raw text with tag column indices")
        idx = sorted({int(t) for t in tags})
        if idx[0] < 0 or idx[-1] >= dim:
            bad = idx[0] if idx[0] < 0 else idx[-1]
            raise TextInputError(f"tag index {bad} is outside the model's {dim} text columns (0..{dim - 1})")
        bow = np.zeros(dim, dtype=np.float32)
        bow[idx] = 1.0
        return bow
    return ([record.text] if record.text else []) + [str(t) for t in tags]
