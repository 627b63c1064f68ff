"""Every error cmhash raises on purpose is a CmhashError (and the built-in a caller expects)."""

import numpy as np
import pytest

import cmhash
from cmhash import metrics
from cmhash.errors import ArgumentTypeError, CmhashError, InvalidArgumentError

CODES = cmhash.pack_codes(np.random.default_rng(0).standard_normal((6, 16)))
LABELS = np.eye(6, 3, dtype=np.int64)


@pytest.mark.parametrize("call, error", [
    (lambda: metrics.mean_average_precision(CODES, CODES, LABELS[:5], LABELS), InvalidArgumentError),
    (lambda: metrics.mean_average_precision(CODES, CODES, LABELS, LABELS[:, :2]), InvalidArgumentError),
    (lambda: metrics.mean_average_precision(CODES, CODES, LABELS, LABELS, k=0), InvalidArgumentError),
    (lambda: metrics.mean_average_precision(CODES, CODES, LABELS, LABELS, k=2.5), ArgumentTypeError),
    (lambda: metrics.precision_at_k(CODES, CODES, LABELS, LABELS, k=[]), InvalidArgumentError),
    (lambda: metrics.mean_average_precision(CODES, CODES, LABELS.astype(float) * np.nan, LABELS), InvalidArgumentError),
    (lambda: metrics.mean_average_precision(CODES, CODES, LABELS, LABELS, threads=0), InvalidArgumentError),
    (lambda: cmhash.pack_codes(np.ones((2, 8)), input="bits"), InvalidArgumentError),
    (lambda: cmhash.from_bitarrays([b"\x00"]), ArgumentTypeError),
])
def test_deliberate_errors_are_cmhash_errors(call, error):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, CmhashError)


def test_the_runtime_raises_no_bare_builtin_errors():
    """Every `raise` of a built-in error class in sdk/cmhash is one of the few internal ones
    that are caught before they reach a caller; everything else raises a CmhashError."""
    import ast
    from pathlib import Path

    # caught in _uses_external_data; the sequence protocol (iteration ends on IndexError)
    internal = {("bundle.py", "_protobuf_fields"), ("bundle.py", "_varint"), ("text.py", "__getitem__")}
    builtin = {"ValueError", "TypeError", "RuntimeError", "KeyError", "OSError", "NotImplementedError", "IndexError"}
    found = []
    for path in sorted((Path(cmhash.__file__).parent).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                        getattr(node.exc.func, "id", None) in builtin and (path.name, func.name) not in internal:
                    found.append(f"{path.name}:{node.lineno} {node.exc.func.id} in {func.name}")
    assert not found, found
