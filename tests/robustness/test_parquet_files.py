"""Damaged Parquet codes files: every truncation or flipped byte ends in a CmhashError
(CodesFileError), or, where the damage missed everything that is read, in the original
codes; never in other codes, another exception or a crash (pages carry checksums)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from cmhash import pack_codes  # noqa: E402
from cmhash import parquet as cp  # noqa: E402
from cmhash.errors import CmhashError  # noqa: E402


def test_damaged_files_fail_cleanly(tmp_path):
    codes = pack_codes(np.random.default_rng(0).standard_normal((50, 64)))
    names = [f"photo-{i}.jpg" for i in range(50)]
    cp.write_table(cp.codes_table(np.arange(50), codes, names, bundle_fingerprint="fp"), tmp_path / "c.parquet")
    good = (tmp_path / "c.parquet").read_bytes()
    rng = np.random.default_rng(1)
    outcomes = {"error": 0, "intact": 0}
    for trial in range(200):
        damaged = bytearray(good)
        if trial % 2:
            damaged = damaged[: rng.integers(0, len(damaged))]
        else:
            for _ in range(rng.integers(1, 5)):
                damaged[rng.integers(0, len(damaged))] ^= int(rng.integers(1, 256))
        (tmp_path / "x.parquet").write_bytes(bytes(damaged))
        try:
            got = cp.read_codes(tmp_path / "x.parquet")
        except CmhashError:
            outcomes["error"] += 1
            continue
        np.testing.assert_array_equal(got.codes, codes)
        np.testing.assert_array_equal(got.ids, np.arange(50))
        assert got.names == names
        outcomes["intact"] += 1
    assert outcomes["error"] > 150, outcomes
