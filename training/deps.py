"""Importing the training dependencies without their own deprecation noise."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator


@contextlib.contextmanager
def without_jit_script_warning() -> Iterator[None]:
    """Hide torch's "`torch.jit.script` is deprecated" FutureWarning, and only it, while a
    dependency that scripts functions at import (torch_geometric) is imported: it concerns
    that package, not cmhash's users, and torch repeats it on every run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                                module=r"torch\.jit\._script")
        yield
