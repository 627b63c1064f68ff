"""Where samples come from: the papers' ``.mat`` layout, the MIRFlickr-25K arrays, a
user's JSONL/CSV manifest. Every loader returns a :class:`CrossModalData` and checks
its input completely (images present and readable, labels inside the label set, no
empty data) before anything trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import scipy.sparse as sp
from PIL import Image

from cmhash.errors import EncodeJobError
from cmhash.inputs import is_index, read_manifest
from cmhash.preprocess import load_image
from cmhash.text import Vocabulary

from ..errors import DataError, MissingImagesError

MAX_LISTED_ERRORS = 10


class ImageSource(Protocol):
    """Anything that gives sample i as an RGB PIL image."""

    def __len__(self) -> int: ...

    def load(self, i: int, min_side: int | None = None) -> Image.Image:
        """Sample i as RGB; ``min_side`` as in :func:`cmhash.preprocess.load_image`."""
        ...


class ImageFiles:
    """Images read from files (paths absolute or relative to nothing: already resolved)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int, min_side: int | None = None) -> Image.Image:
        # The runtime's decoder, so that training sees the pixels the SDK sees (EXIF
        # orientation, transparency on white, 16-bit grey, first frame, reduced JPEG
        # decoding); a damaged file raises ImageDecodeError naming it.
        return load_image(self.paths[i], min_side=min_side)


def check_image_files(paths: Sequence[Path], root: Path | None = None, open_files: bool = True) -> None:
    """Raise :class:`MissingImagesError` naming every absent (and, with ``open_files``,
    every unreadable) file, before training starts rather than in the middle of an epoch.

    With ``open_files`` every image is decoded to its end, so a truncated or corrupt file is
    caught, not only a bad header. JPEGs, most of a photo collection, are decoded at 1/8
    scale: the whole compressed stream is read and checked, but little of the pixel work is
    done."""
    missing, unreadable = [], []
    for p in paths:
        if not p.is_file():
            missing.append(p)
        elif open_files:
            try:
                with Image.open(p) as im:
                    if im.format == "JPEG":
                        im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()  # raises on a truncated or corrupt stream (LOAD_TRUNCATED_IMAGES is off)
            except Exception as exc:  # PIL raises several types; all mean "not an image"
                unreadable.append((p, f"{type(exc).__name__}: {exc}"))
    if missing or unreadable:
        raise MissingImagesError(root, missing, unreadable, total=len(paths))


@dataclass
class CrossModalData:
    """All samples of one collection, before splitting.

    Text is held either as a bag-of-words matrix over ``vocabulary`` (``bow``) or, when
    the vocabulary is still to be built from the training split, as raw ``texts`` (each a
    list of parts: the caption and/or tags, tokenised separately); :meth:`with_vocabulary`
    turns the second into the first.
    """

    name: str
    images: ImageSource
    labels: np.ndarray  # (n, C) float32 in {0, 1}
    label_names: list[str]
    bow: sp.csr_matrix | None = None  # (n, V) float32 in {0, 1}
    vocabulary: Vocabulary | None = None
    texts: list[list[str]] | None = None
    ngram_max: int = 1  # n-grams of the vocabulary to be built from the texts
    info: dict = field(default_factory=dict)  # provenance recorded with the model

    def __post_init__(self):
        n = len(self.images)
        if n == 0:
            raise DataError(f"{self.name}: the data holds no samples")
        self.labels = np.asarray(self.labels, dtype=np.float32)
        if self.labels.ndim != 2 or self.labels.shape[0] != n:
            raise DataError(f"{self.name}: labels must be ({n}, C), got {self.labels.shape}")
        if not np.isin(self.labels, (0.0, 1.0)).all():
            raise DataError(f"{self.name}: labels must be 0/1 multi-hot")
        if len(self.label_names) != self.labels.shape[1]:
            raise DataError(f"{self.name}: {len(self.label_names)} label names for {self.labels.shape[1]} label columns")
        if (self.bow is None) == (self.texts is None):
            raise DataError(f"{self.name}: give text as either a bag-of-words matrix or raw texts")
        if self.bow is not None:
            self.bow = sp.csr_matrix(self.bow, dtype=np.float32)
            if self.bow.shape[0] != n:
                raise DataError(f"{self.name}: {self.bow.shape[0]} text rows for {n} images")
            if self.vocabulary is None or len(self.vocabulary) != self.bow.shape[1]:
                raise DataError(f"{self.name}: the bag-of-words matrix needs its vocabulary of {self.bow.shape[1]} terms")
        elif len(self.texts) != n:
            raise DataError(f"{self.name}: {len(self.texts)} texts for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_labels(self) -> int:
        return self.labels.shape[1]

    def build_vocabulary(self, indices: Sequence[int], min_count: int = 1, max_size: int | None = None) -> Vocabulary:
        """A vocabulary from the texts of ``indices`` (the training split, so that no
        query text leaks into it)."""
        if self.texts is None:
            return self.vocabulary
        return Vocabulary.build((self.texts[i] for i in indices), min_count=min_count,
                                max_size=max_size, ngram_max=self.ngram_max)

    def with_vocabulary(self, vocabulary: Vocabulary) -> "CrossModalData":
        """The same samples with their texts encoded over ``vocabulary`` (the tokenisation
        rules are the vocabulary's own, as at inference)."""
        if self.texts is None:
            raise DataError(f"{self.name}: the text is already a bag-of-words matrix over a fixed vocabulary")
        rows = [vocabulary.columns(parts) for parts in self.texts]
        return CrossModalData(self.name, self.images, self.labels, self.label_names,
                              bow=_rows_to_csr(rows, len(vocabulary)), vocabulary=vocabulary, info=dict(self.info))

    def text(self, i: int) -> np.ndarray:
        if self.bow is None:
            raise DataError(f"{self.name}: build the vocabulary first (with_vocabulary)")
        return self.bow[i].toarray()[0]


def _rows_to_csr(rows: Sequence[np.ndarray], width: int) -> sp.csr_matrix:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), width))


def read_label_names(names: Sequence[str] | str | Path) -> list[str]:
    """A list as is, or a text file with one name per line."""
    if isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise FileNotFoundError(f"label names file not found: {path}")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = list(names)
    if len(set(names)) != len(names):
        raise DataError(f"label names must be unique: {names}")
    return names


# --------------------------------------------------------------------------------------
# The papers' .mat layout (DCMH / GCDH / TEGAH): image list, tag BoW, label matrix.

def read_mat_variable(path: Path, key: str | None) -> np.ndarray:
    """One variable of a MATLAB file (the only one when ``key`` is None); a file that is not
    a readable ``.mat`` is a :class:`DataError`."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".mat file not found: {path}")
    try:
        content = scipy.io.loadmat(str(path))
    except NotImplementedError as exc:  # scipy's message for MATLAB v7.3 (HDF5) files
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it with "
                        f"scipy.io.savemat or MATLAB's save(..., '-v7') first") from exc
    except (ValueError, TypeError, IndexError, KeyError, EOFError, OSError, scipy.io.matlab.MatReadError) as exc:
        # a truncated file or one that is not a .mat: scipy raises any of these
        raise DataError(f"{path} is not a readable MATLAB (.mat) file: {exc}") from exc
    variables = {k: v for k, v in content.items() if not k.startswith("__")}
    if key is None:
        if len(variables) != 1:
            raise DataError(f"{path} holds variables {sorted(variables)}; say which one to use")
        return next(iter(variables.values()))
    if key not in variables:
        raise DataError(f"{path} has no variable {key!r}; it holds {sorted(variables)}")
    return variables[key]


def _as_strings(arr: np.ndarray) -> list[str]:
    """Image names from a MATLAB char matrix or cell array."""
    if arr.dtype.kind == "U":  # a char matrix: scipy gives one string per row
        return [str(s).strip() for s in arr.reshape(-1)]
    if arr.dtype == object:
        return [str(np.asarray(s).reshape(-1)[0]).strip() for s in arr.reshape(-1)]
    raise DataError(f"cannot read image names from an array of dtype {arr.dtype}")


def _rows_first(arr: np.ndarray, n: int, what: str, path: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} must be a 2-D matrix, got shape {arr.shape}")
    if arr.shape[0] == n:
        return arr
    if arr.shape[1] == n:  # MATLAB files are sometimes stored column-per-sample
        return arr.T
    raise DataError(f"{path}: {what} has shape {arr.shape}, which does not match the {n} images")


def load_mat_layout(image_list: str | Path, tags: str | Path, labels: str | Path, image_root: str | Path,
                    keys: dict | None = None, label_names: Sequence[str] | str | Path | None = None,
                    name: str = "mat", check_images: bool = True) -> CrossModalData:
    """The layout of the papers' public code: ``imgList.mat`` (image names, key ``FAll``),
    ``tagList.mat`` (bag of words, ``YAll``), ``labelList.mat`` (labels, ``LAll``), images
    under ``image_root``. ``keys`` overrides the variable names ({"images", "tags",
    "labels"}); a key of None takes the file's only variable. The tag words were never
    published, so the vocabulary is anonymous (column indices)."""
    keys = {"images": "FAll", "tags": "YAll", "labels": "LAll", **(keys or {})}
    image_list, tags, labels, image_root = Path(image_list), Path(tags), Path(labels), Path(image_root)
    names = _as_strings(read_mat_variable(image_list, keys["images"]))
    n = len(names)
    label_matrix = _rows_first(read_mat_variable(labels, keys["labels"]), n, "the label matrix", labels).astype(np.float32)
    bow = _rows_first(read_mat_variable(tags, keys["tags"]), n, "the tag matrix", tags)
    bow = (np.asarray(bow) > 0).astype(np.float32)
    names_list = read_label_names(label_names) if label_names is not None else [f"label{j}" for j in range(label_matrix.shape[1])]
    paths = [image_root / s.removeprefix("./") for s in names]
    if check_images:
        check_image_files(paths, image_root)
    return CrossModalData(name, ImageFiles(paths), label_matrix, names_list, bow=sp.csr_matrix(bow),
                          vocabulary=Vocabulary.anonymous_of_size(bow.shape[1]),
                          info={"source": "mat", "image_list": str(image_list), "tags": str(tags), "labels": str(labels)})


def load_mirflickr25k(arrays: str | Path, image_root: str | Path, label_names: Sequence[str] | str | Path | None = None,
                      check_images: bool = True) -> CrossModalData:
    """MIRFlickr-25K from ``labels_tags.npz`` (``labels`` 20015x24, ``tags`` 20015x1386,
    ``index`` = N of ``imN.jpg``), the images in ``image_root``."""
    arrays = Path(arrays)
    if not arrays.is_file():
        raise FileNotFoundError(f"MIRFlickr-25K arrays not found: {arrays}")
    with np.load(arrays, allow_pickle=False) as z:
        labels, tags, index = z["labels"], z["tags"], z["index"]
    if label_names is None and (arrays.parent / "label_names.txt").is_file():
        label_names = arrays.parent / "label_names.txt"
    names = read_label_names(label_names) if label_names is not None else [f"label{j}" for j in range(labels.shape[1])]
    image_root = Path(image_root)
    paths = [image_root / f"im{int(k)}.jpg" for k in index]
    if check_images:
        check_image_files(paths, image_root)
    tags = (tags > 0).astype(np.float32)
    return CrossModalData("mirflickr25k", ImageFiles(paths), labels.astype(np.float32), names,
                          bow=sp.csr_matrix(tags), vocabulary=Vocabulary.anonymous_of_size(tags.shape[1]),
                          info={"source": "mirflickr25k", "arrays": str(arrays), "image_root": str(image_root)})


# --------------------------------------------------------------------------------------
# A user's manifest (JSONL or CSV).

def load_manifest(path: str | Path, label_names: Sequence[str] | str | Path | None = None,
                  vocabulary: Vocabulary | str | Path | None = None, image_root: str | Path | None = None,
                  ngram_max: int = 1, check_images: bool = True, name: str | None = None) -> CrossModalData:
    """A manifest of the user's own data, one record per sample, read by the runtime's
    manifest reader (:func:`cmhash.inputs.read_manifest`: one format for training and
    ``cmhash encode``).

    Fields: ``image`` (path, relative to ``image_root`` or else to the manifest's folder),
    ``text`` (raw text) and/or ``tags`` (words, or column indices into a given
    vocabulary), ``labels`` (names, or indices into ``label_names``). JSONL holds lists;
    CSV cells separate several tags or labels with ``|``. ``ngram_max`` sets the n-grams
    of a vocabulary built from the texts.

    Without ``label_names`` the label set is the sorted names found. Without a
    ``vocabulary`` the texts are kept raw, and the vocabulary is built later
    from the training split (``CrossModalData.with_vocabulary``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    try:
        records = read_manifest(path, image_root=root)
    except EncodeJobError as exc:
        raise DataError(str(exc)) from None
    if not records:
        raise DataError(f"{path}: the manifest is empty; it needs one record per sample "
                        f"with fields image, text and/or tags, labels")
    if isinstance(vocabulary, (str, Path)):
        vocabulary = Vocabulary.load(vocabulary)
    known = read_label_names(label_names) if label_names is not None else None

    errors = [f"{r.where}: {r.problem}" for r in records if r.problem]
    if not any(r.has_text for r in records) and not errors:
        errors.append("no record has a 'text' or 'tags' field, so there is no text modality")
    label_lists, image_paths, text_parts = [], [], []
    for r in records:
        if r.image is None and not r.problem:
            errors.append(f"{r.where}: no 'image' field")
        image_paths.append(r.image or root)
        label_lists.append((r.where, list(r.labels or ())))
        text_parts.append((r.where, r.text, list(r.tags)))

    # Labels: names or indices, all inside the label set.
    index_labels = [all(is_index(x) for x in labels) and labels for _, labels in label_lists]
    if known is None:
        if any(index_labels):
            errors.append("labels are given as indices, so label_names must be given too")
            known = []
        else:
            known = sorted({str(x) for _, labels in label_lists for x in labels})
            if not known:
                errors.append("no record has any label; supervised hashing needs labels")
    position = {n: j for j, n in enumerate(known)}
    label_matrix = np.zeros((len(records), len(known)), dtype=np.float32)
    bad_labels = []
    for row, (where, labels) in enumerate(label_lists):
        for x in labels:
            j = int(x) if is_index(x) and x not in position else position.get(x)
            if j is None or not 0 <= j < len(known):
                bad_labels.append(f"{where}: {x!r}")
            else:
                label_matrix[row, j] = 1.0
    if bad_labels and known:
        errors.append(f"{len(bad_labels)} labels outside the label set {known}: " + "; ".join(bad_labels[:MAX_LISTED_ERRORS]))

    # Text: words (kept raw until there is a vocabulary) or tag indices (need a vocabulary).
    texts, index_rows = [], []
    for where, text, tags in text_parts:
        if tags and all(is_index(t) for t in tags):
            if vocabulary is None:
                errors.append(f"{where}: tags are column indices, which need a vocabulary "
                              f"(e.g. Vocabulary.anonymous_of_size(size))")
                break
            idx = np.array(sorted({int(t) for t in tags}), dtype=np.int64)
            if idx.min() < 0 or idx.max() >= len(vocabulary):
                errors.append(f"{where}: tag index outside the vocabulary of {len(vocabulary)} terms")
            index_rows.append(idx[(idx >= 0) & (idx < len(vocabulary))])
            texts.append(None)
        else:
            if vocabulary is not None and vocabulary.anonymous and (text or tags):
                errors.append(f"{where}: words given, but the vocabulary has column indices only")
            texts.append([] if vocabulary is not None and vocabulary.anonymous else
                         ([text] if text else []) + [str(t) for t in tags])
            index_rows.append(None)
    if errors:
        raise DataError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors[:MAX_LISTED_ERRORS]))

    if check_images:
        check_image_files(image_paths, root)
    info = {"source": "manifest", "manifest": str(path), "image_root": str(root)}
    images = ImageFiles(image_paths)
    if vocabulary is None:
        return CrossModalData(name or path.stem, images, label_matrix, known, texts=texts,
                              ngram_max=ngram_max, info=info)
    rows = [vocabulary.columns(parts) if idx is None else idx for parts, idx in zip(texts, index_rows)]
    return CrossModalData(name or path.stem, images, label_matrix, known, bow=_rows_to_csr(rows, len(vocabulary)),
                          vocabulary=vocabulary, info=info)


def load_mirflickr_mini(root: str | Path, check_images: bool = True) -> CrossModalData:
    """The 530-photo MIRFlickr-25K sample (a folder with manifest.jsonl, label_names.txt and images) through the manifest
    loader; tags are column indices of the 1,386-word MIRFlickr tag vocabulary."""
    root = Path(root)
    return load_manifest(root / "manifest.jsonl", label_names=root / "label_names.txt",
                         vocabulary=Vocabulary.anonymous_of_size(1386), check_images=check_images, name="mirflickr-mini")
