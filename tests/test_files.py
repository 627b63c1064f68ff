"""cmhash.files: the atomic write every saved file goes through (index, bundle archive,
vocabulary, encode parts, training metrics and feature caches)."""

from __future__ import annotations

import pytest

from cmhash.files import atomic_path, atomic_write


def test_atomic_write_replaces_the_file_from_bytes_or_chunks(tmp_path):
    target = tmp_path / "data.bin"
    assert atomic_write(target, b"first") == target and target.read_bytes() == b"first"
    atomic_write(target, [b"sec", memoryview(b"ond")])
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def chunks():
        yield b"half of the new"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, chunks())
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]
