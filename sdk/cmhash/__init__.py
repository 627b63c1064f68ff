"""cmhash: cross-modal deep hashing. Images and texts in, compact binary codes out,
searched by Hamming distance.

The runtime (this package) needs numpy, bitarray, Pillow, onnxruntime (loaded only when
an :class:`Encoder` is made) and the bundled C extension; training (``cmhash.training``)
and export (``cmhash.export``) need the ``train`` / ``export`` extras.
"""

from __future__ import annotations

from . import metrics
from ._version import __version__
from .backends import available_providers
from .codes import from_bitarrays, pack_codes, to_bitarrays, unpack_codes
from .encoder import Encoder
from .errors import (
    ArgumentTypeError,
    BackendUnavailableError,
    BundleError,
    CmhashError,
    CodeFormatError,
    ImageDecodeError,
    IndexChangedError,
    IndexFileError,
    InvalidArgumentError,
    ProviderUnavailableError,
    ReferenceCheckError,
    ResourceLimitError,
    TextInputError,
    UnknownIdError,
    UnknownTextWarning,
    UnsupportedInputError,
)
from .index import HashIndex, MultiIndex, load_index
from .search import hamming_distances, knn_search, range_search

__all__ = [
    "__version__",
    "pack_codes",
    "unpack_codes",
    "to_bitarrays",
    "from_bitarrays",
    "hamming_distances",
    "knn_search",
    "range_search",
    "HashIndex",
    "MultiIndex",
    "load_index",
    "Encoder",
    "metrics",
    "CmhashError",
    "CodeFormatError",
    "InvalidArgumentError",
    "ArgumentTypeError",
    "ResourceLimitError",
    "IndexFileError",
    "IndexChangedError",
    "UnknownIdError",
    "BundleError",
    "ImageDecodeError",
    "TextInputError",
    "UnknownTextWarning",
    "UnsupportedInputError",
    "BackendUnavailableError",
    "ReferenceCheckError",
    "ProviderUnavailableError",
    "available_providers",
]
