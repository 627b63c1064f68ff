"""Fuzzing of the C library's index reader (native/lib/cmhash.c): damaged index files
(truncated, bytes flipped, header fields rewritten with a valid header checksum, huge
counts, bad ids, random bytes) each open with a typed status code, or open and search
without error; never a crash. The driver tests/native/open_index.c is built with
AddressSanitizer and UndefinedBehaviorSanitizer (leak checks included) when the compiler
has them, so any out-of-bounds read, overflow or leak fails the run. A damaged format 1.0
file opens with verification exactly when HashIndex.load accepts it."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from cmhash import HashIndex  # noqa: E402
from cmhash.errors import IndexFileError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OK, ARGUMENT, IO, NOT_INDEX, VERSION, TRUNCATED, HEADER_CHECKSUM, HEADER, PAYLOAD_CHECKSUM, IDS = 0, 1, 3, 4, 5, 6, 7, 8, 9, 10
STATUSES = set(range(12))
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
U64 = 2**64 - 1


def compiles_and_runs(flags: list[str], tmp: Path) -> bool:
    (tmp / "probe.c").write_text("#include <stdlib.h>\nint main(void) { free(malloc(8)); return 0; }\n")
    proc = subprocess.run(["cc", *flags, str(tmp / "probe.c"), "-o", str(tmp / "probe")], capture_output=True)
    return proc.returncode == 0 and subprocess.run([str(tmp / "probe")], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    missing = [tool for tool in ("make", "cc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed")
    build = tmp_path_factory.mktemp("clib_fuzz")
    flags = ["-O1", "-g", *(SANITIZE if compiles_and_runs(SANITIZE, build) else [])]
    lib = build / "libcmhash.a"
    proc = subprocess.run(["make", "-C", str(ROOT / "native"), f"BUILD={build}", f"CFLAGS={' '.join(flags)}", "-j2", str(lib)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exe = build / "open_index"
    proc = subprocess.run(["cc", "-std=c11", "-pthread", *flags, f"-I{ROOT / 'native' / 'include'}",
                           str(ROOT / "tests" / "native" / "open_index.c"), str(lib), "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def statuses(driver: Path, paths: list[Path]) -> list[dict[str, int]]:
    """The driver's statuses for each file: open, verify, knn, range (-1: not run)."""
    env = {**os.environ, "ASAN_OPTIONS": "abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    env.pop("CMHASH_SIMD", None)
    proc = subprocess.run([str(driver), *map(str, paths)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]  # a crash or a sanitizer report
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths), proc.stdout
    return [{k: int(v) for k, v in (item.split("=") for item in line.split())} for line in lines]


def base_file(tmp: Path) -> bytes:
    """A valid format 1.0 index: 37 codes of 24 bits (odd, so the ids follow padding), random
    ids. ``HashIndex.save`` writes 1.1; without names or metadata it adds no sections, so the
    same bytes with minor version 0 are the 1.0 file."""
    rng = np.random.default_rng(7)
    index = HashIndex(24)
    index.add(rng.integers(0, 256, (37, 3), dtype=np.uint8), ids=rng.choice(10**15, 37, replace=False))
    index.save(tmp / "base.cmhidx")
    data = (tmp / "base.cmhidx").read_bytes()
    assert len(data) == 64 + struct.unpack_from("<Q", data, 40)[0], "a plain index has sections"
    return rewrite(data, minor=0)


HEADER_FIELDS = {"major": (8, "H"), "minor": (10, "H"), "flags": (12, "I"), "bits": (16, "I"), "offset": (20, "I"),
                 "count": (24, "Q"), "next_id": (32, "Q"), "payload_len": (40, "Q"), "payload_crc": (48, "I"),
                 "kind": (52, "I")}


def rewrite(data: bytes, **fields) -> bytes:
    """``data`` with header fields changed and the header checksum recomputed."""
    head = bytearray(data[:64])
    for name, value in fields.items():
        offset, fmt = HEADER_FIELDS[name]
        struct.pack_into("<" + fmt, head, offset, value)
    struct.pack_into("<I", head, 60, zlib.crc32(head[:60]))
    return bytes(head) + data[64:]


def with_payload_crc(data: bytes) -> bytes:
    return rewrite(data, payload_crc=zlib.crc32(data[64:]))


def flip(data: bytes, pos: int, mask: int = 0x5A) -> bytes:
    return data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1 :]


def python_accepts(path: Path) -> bool:
    try:
        HashIndex.load(path)
    except IndexFileError:
        return False
    return True


def check(driver: Path, tmp: Path, files: list[bytes]) -> list[dict[str, int]]:
    """Runs the driver on the files; checks what holds for any file and returns the statuses."""
    paths = []
    for i, data in enumerate(files):
        paths.append(tmp / f"f{i}.cmhidx")
        paths[-1].write_bytes(data)
    results = statuses(driver, paths)
    for data, path, res in zip(files, paths, results):
        assert {res["open"], res["verify"]} <= STATUSES, res
        if res["open"] == OK:  # an index that opens can be searched
            assert res["knn"] == OK and res["range"] == OK and res["verify"] in (OK, PAYLOAD_CHECKSUM, IDS), res
        else:  # the same header checks with and without verification
            assert res["verify"] == res["open"] and res["knn"] == res["range"] == -1, res
        if len(data) < 12 or struct.unpack_from("<H", data, 10)[0] == 0:  # format 1.0: as HashIndex.load
            assert (res["verify"] == OK) == python_accepts(path), (res, data[:64].hex())
    return results


def test_damaged_files_give_typed_status_codes(driver, tmp_path):
    base = base_file(tmp_path)
    count, payload_len = 37, len(base) - 64
    cases = [(base, OK, OK), (b"", TRUNCATED, TRUNCATED), (b"CMHI", TRUNCATED, TRUNCATED),
             (b"PK\x03\x04" + bytes(100), NOT_INDEX, NOT_INDEX)]
    cases += [(base[:cut], TRUNCATED, TRUNCATED) for cut in (8, 11, 12, 63, 64, 65, 64 + 111, len(base) - 1)]
    cases += [(flip(base, pos), NOT_INDEX, NOT_INDEX) for pos in range(8)]
    cases += [(flip(base, pos), VERSION, VERSION) for pos in (8, 9)]
    cases += [(flip(base, pos), HEADER_CHECKSUM, HEADER_CHECKSUM) for pos in range(10, 64)]
    # the codes, the padding after them, the ids: only the payload checksum sees it
    cases += [(flip(base, pos), OK, PAYLOAD_CHECKSUM) for pos in (64, 64 + 110, 64 + 111, 64 + 127, 64 + 128, len(base) - 1)]
    cases += [(rewrite(base, major=major), VERSION, VERSION) for major in (0, 2, 0xFFFF)]
    cases += [(rewrite(base, **fields), HEADER, HEADER) for fields in [
        {"flags": 1}, {"flags": 1 << 31}, {"bits": 0}, {"bits": 12}, {"bits": 8}, {"bits": 65536}, {"bits": 2**32 - 8},
        {"offset": 0}, {"offset": 128}, {"count": count + 1}, {"count": count - 1}, {"count": 2**63}, {"count": U64},
        {"payload_len": payload_len + 64}, {"payload_len": U64},
        {"count": 2**61, "bits": 65528, "payload_len": U64 - 63},  # sizes that overflow 64 bits
    ]]
    huge = 2**40  # a consistent header announcing 2^40 codes: a truncated file, nothing mapped
    cases += [(rewrite(base, count=huge, payload_len=huge * 3 + (-huge * 3) % 64 + huge * 8), TRUNCATED, TRUNCATED)]
    cases += [(rewrite(base, minor=minor), OK, OK) for minor in (1, 7, 0xFFFF)]  # 1.x readers read any minor
    cases += [(rewrite(base, kind=kind, minor=1) + b"tables", OK, OK) for kind in (0, 1, 99)]
    cases += [(base + b"\x00", HEADER, HEADER)]  # a 1.0 file ends with its ids
    cases += [(rewrite(base, kind=1), HEADER, HEADER)]  # 1.0 has no index kind: bytes 52..59 are zero
    empty = rewrite(base, count=0, payload_len=0, payload_crc=0)[:64]
    cases += [(empty, OK, OK), (empty + b"x", HEADER, HEADER)]
    ids_at = 64 + 128  # 37 codes of 3 bytes (111), padded to a multiple of 64
    negative = base[:ids_at] + struct.pack("<q", -5) + base[ids_at + 8 :]
    duplicate = base[:ids_at] + base[ids_at + 8 : ids_at + 16] + base[ids_at + 8 :]
    cases += [(with_payload_crc(negative), OK, IDS), (with_payload_crc(duplicate), OK, IDS)]
    results = check(driver, tmp_path, [data for data, _, _ in cases])
    got = [(res["open"], res["verify"]) for res in results]
    assert got == [(want_open, want_verify) for _, want_open, want_verify in cases]
    # not a file
    (res,) = statuses(driver, [tmp_path])
    assert res["open"] == res["verify"] == IO


@st.composite
def damaged(draw, base: bytes) -> bytes:
    """Random damage to a valid index file."""
    kind = draw(st.sampled_from(["bytes", "flips", "fields", "cut", "tail"]))
    if kind == "bytes":
        prefix = draw(st.sampled_from([b"", base[:8], base[:12], base[:64]]))
        return prefix + draw(st.binary(max_size=200))
    if kind == "flips":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        data = bytes(data)
        if draw(st.booleans()):  # past the header checksum, into the field checks
            data = rewrite(data)
        return with_payload_crc(data) if draw(st.booleans()) else data
    if kind == "fields":
        names = draw(st.lists(st.sampled_from(sorted(HEADER_FIELDS)), min_size=1, max_size=3, unique=True))
        limits = {"H": 2**16 - 1, "I": 2**32 - 1, "Q": U64}
        special = st.sampled_from([0, 1, 8, 24, 37, 64, 2**31, 2**32 - 1, 2**63, U64])
        fields = {}
        for name in names:
            limit = limits[HEADER_FIELDS[name][1]]
            fields[name] = draw(st.one_of(st.integers(0, limit), special.filter(lambda v, limit=limit: v <= limit)))
        return rewrite(base, **fields)
    if kind == "cut":
        return base[: draw(st.integers(0, len(base)))]
    return rewrite(base, minor=draw(st.integers(0, 3))) + draw(st.binary(min_size=1, max_size=100))


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_damage_never_crashes(driver, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    base = base_file(tmp)
    files = data.draw(st.lists(damaged(base), min_size=30, max_size=30))
    check(driver, tmp, files)
