"""The exceptions cmhash raises. Each subclasses the built-in a caller would expect,
so ``except ValueError`` still works, while ``except cmhash.CmhashError`` catches all."""

from __future__ import annotations


class CmhashError(Exception):
    """Base class of every error cmhash raises on purpose."""


class InvalidArgumentError(CmhashError, ValueError):
    """An argument out of its range: k < 1, a negative radius, a thread count of 0, duplicate
    or negative ids."""


class ArgumentTypeError(CmhashError, TypeError):
    """An argument of the wrong type: a float where an int goes, ids that are not integers."""


class ResourceLimitError(CmhashError, ValueError):
    """A request whose result or input would exceed a size limit (see :mod:`cmhash.limits`);
    the message names the limit and how to raise it."""


class CodeFormatError(CmhashError, ValueError):
    """Codes of the wrong dtype, shape or bit length (e.g. 64-bit queries on a 32-bit index)."""


class IndexFileError(CmhashError, ValueError):
    """An index file that is truncated, corrupted, of another format or of an unknown version."""


class IndexChangedError(IndexFileError):
    """The file under a memory-mapped index was modified or truncated in place after loading.
    Replace index files atomically (``HashIndex.save`` does) and load the new file again."""


class BundleMismatchError(CmhashError, ValueError):
    """A bundle and an index that do not belong together: the index holds codes of another
    bundle (its recorded fingerprint differs) or of another bit length. Query an index with
    the bundle that encoded its collection, or encode the collection again with this one."""


class NotFoundError(CmhashError, LookupError):
    """Something a query names that the service does not have: a collection, an item, a
    thumbnail (``cmhash serve`` answers 404)."""


class RequestTooLargeError(ResourceLimitError):
    """A request body over :data:`cmhash.limits.MAX_UPLOAD_BYTES` (``cmhash serve`` answers 413)."""


class IndexFullError(CmhashError, OverflowError):
    """Automatic ids have run out: the next one would not fit in int64. Pass explicit ids."""


class UnknownIdError(CmhashError, KeyError):
    """An id that is not in the index (e.g. asking ``HashIndex.names`` about a removed id)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedInputError(CmhashError, TypeError):
    """An input of a type the encoder cannot take (e.g. a dict where an image or a text goes)."""


class ImageDecodeError(CmhashError, ValueError):
    """An image that cannot be decoded: zero bytes, truncated, corrupt, not an image, or of a
    pixel format with no agreed conversion to RGB."""


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than the per-call limit (a decompression-bomb guard)."""


class ImageNotFoundError(CmhashError, FileNotFoundError):
    """An image path that does not exist."""


class TextInputError(CmhashError, ValueError):
    """A text that cannot be encoded (bytes that are not UTF-8), or a bag-of-words array of the
    wrong shape or with values other than 0 and 1."""


class UnknownTextError(TextInputError):
    """A text none of whose words is in the bundle's vocabulary (``on_unknown="error"``): its
    code would be the code of the empty text, the same for every such text."""


class UncheckedIndexWarning(UserWarning):
    """An index that records no bundle fingerprint (built from bare codes, or by an older
    cmhash), so that nothing can check that a bundle's queries belong in it."""


class UnknownTextWarning(UserWarning):
    """Texts none of whose words is in the bundle's vocabulary were hashed as the empty text
    (``on_unknown="warn"``, the default). Silence it with ``on_unknown="ignore"``."""


class VocabularyError(CmhashError, ValueError):
    """A vocabulary file or word list that is malformed or breaks its own tokenisation rules."""


class BundleError(CmhashError, ValueError):
    """A model bundle that is malformed: bad manifest, missing, extra or unsafe files."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """A bundle path that does not exist."""


class BundlePermissionError(BundleError, PermissionError):
    """A bundle, or a file in it, that this process may not read (check its owner and mode)."""


class BundleTooLargeError(BundleError, ResourceLimitError):
    """A bundle whose files add up to more than :data:`cmhash.limits.MAX_BUNDLE_BYTES`."""


class BundleVersionError(BundleError):
    """A bundle written in a format version this cmhash cannot read."""


class BundleChecksumError(BundleError):
    """A bundle file whose sha256 differs from the one the manifest records (tampered or corrupt)."""


class ModelSignatureError(BundleError):
    """A model whose inputs or outputs (names, ranks, sizes, dtypes) do not match the manifest."""


class BackendUnavailableError(CmhashError, RuntimeError):
    """An inference backend or device that is not installed or not present on this machine."""


class ProviderUnavailableError(BackendUnavailableError):
    """An onnxruntime execution provider this machine's onnxruntime does not offer, or that
    failed to start; the message names the package that has it. ``provider`` is its name."""

    def __init__(self, message: str, provider: str = ""):
        super().__init__(message)
        self.provider = provider


class ReferenceCheckError(CmhashError, RuntimeError):
    """A bundle's models that, on this machine and backend, do not reproduce the reference
    codes stored at export (``Encoder.load(..., verify=True)``, ``cmhash verify``).

    ``report`` holds the figures per modality and variant, and ``passing_variants``."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class BackendError(CmhashError, RuntimeError):
    """An inference backend that failed at run time (an engine that did not build or load, a
    device call that failed)."""


class ExportError(CmhashError, RuntimeError):
    """An export that cannot be done: an unreadable checkpoint, a tower that does not export
    to a valid ONNX graph, no real inputs to verify or calibrate with, a missing extra."""


class VerificationError(ExportError):
    """An exported model that disagrees with PyTorch beyond the allowed tolerance.

    ``report`` holds the figures of every modality and variant checked (the failing ones
    have ``"passed": false``)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class EncodeJobError(CmhashError, ValueError):
    """An offline encoding job that cannot start or resume: an unreadable input list, an
    output folder holding another job, a bad shard."""


class CodesFileError(CmhashError, ValueError):
    """A codes file (``.npy``, ``.npz``, Parquet or a folder of Parquet parts) that cannot be
    read as packed codes: a missing column, a wrong type, Python objects, a truncated file, or
    parts that disagree on bit length, bit order or bundle fingerprint."""


class MissingExtraError(CmhashError, ImportError):
    """An optional package (pyarrow, fsspec, faiss) that a call needs and that is not installed;
    the message names the pip extra that brings it."""


class ShardUnavailableError(CmhashError, RuntimeError):
    """A shard of a distributed index could not answer: its server died more often than the
    retries allow during one query. Check the node and the shard file, then ask again."""
