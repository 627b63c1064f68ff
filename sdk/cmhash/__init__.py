"""cmhash: cross-modal deep hashing. Images and texts in, compact binary codes out,
searched by Hamming distance.

The runtime (this package) needs numpy and the bundled C extension only; training
(``cmhash.training``) and export (``cmhash.export``) need the ``train`` / ``export`` extras.
"""

from __future__ import annotations

from ._version import __version__
from .codes import pack_codes, unpack_codes, to_bitarrays, from_bitarrays
from .errors import CmhashError, CodeFormatError, IndexFileError

__all__ = [
    "__version__",
    "pack_codes",
    "unpack_codes",
    "to_bitarrays",
    "from_bitarrays",
    "CmhashError",
    "CodeFormatError",
    "IndexFileError",
]
