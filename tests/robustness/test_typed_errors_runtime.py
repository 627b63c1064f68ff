"""Deliberate errors of the backends, the preprocessor and the input reader are CmhashErrors
(and the built-in a caller expects)."""

import numpy as np
import pytest

from cmhash.backends import backend_class
from cmhash.backends.base import parse_device
from cmhash.errors import ArgumentTypeError, CmhashError, InvalidArgumentError
from cmhash.inputs import read_collection
from cmhash.preprocess import ImagePreprocessor

CASES = [
    (lambda: backend_class("tensorflow"), InvalidArgumentError),
    (lambda: parse_device("cudaX"), InvalidArgumentError),
    (lambda: parse_device("cuda:²"), InvalidArgumentError),
    (lambda: parse_device(0), ArgumentTypeError),
    (lambda: ImagePreprocessor(image_size=0), InvalidArgumentError),
    (lambda: ImagePreprocessor(interpolation="cubic-ish"), InvalidArgumentError),
    (lambda: ImagePreprocessor(std=(1, 0, 1)), InvalidArgumentError),
    (lambda: ImagePreprocessor().transform(__import__("PIL.Image").Image.new("L", (4, 4))), InvalidArgumentError),
    (lambda: read_collection(".", "audio"), InvalidArgumentError),
]


@pytest.mark.parametrize("call, error", CASES)
def test_deliberate_errors_are_cmhash_errors(call, error):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, CmhashError)
