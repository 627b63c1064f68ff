"""The C library (native/Makefile: libcmhash.a, libcmhash.so, cmhash-search) against
HashIndex: the example program and the shared library search index files written by Python
and must return exactly what HashIndex.search and HashIndex.range_search return, at every
SIMD level, for format 1.0 files and 1.1 files with trailing sections, and cross-compiled
for ARM64 under qemu against the same files."""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import cmhash._hamming as h
from cmhash import HashIndex, hamming_distances

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
N = 300  # codes per index: a few blocks of candidates, fast under qemu
STATUS = {"OK": 0, "ARGUMENT": 1, "IO": 3, "TRUNCATED": 6, "HEADER": 8, "SIMD": 11}


def make(build: Path, *args: str, compiler: str = "cc") -> Path:
    """Builds the library and the example into ``build`` with native/Makefile."""
    missing = [tool for tool in ("make", compiler) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed")
    proc = subprocess.run(["make", "-C", str(NATIVE), f"BUILD={build}", f"CC={compiler}", "-j2", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning" not in proc.stderr, proc.stderr[-4000:]  # the code builds cleanly everywhere
    return build


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("clib"))


@pytest.fixture(scope="module")
def arm64_build(tmp_path_factory) -> Path:
    """Cross-compiled, the example linked statically so that qemu needs no ARM64 C library."""
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 not installed (Debian: qemu-user)")
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc not installed (Debian: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross)")
    return make(tmp_path_factory.mktemp("arm64"), "STATIC=1", compiler="aarch64-linux-gnu-gcc")


def with_header(data: bytes, minor: int, kind: int = 0, trailing: bytes = b"") -> bytes:
    """The index file ``data`` as format 1.<minor> of the given index kind, followed by
    ``trailing`` bytes (a section a 1.1 reader skips); the header checksum recomputed."""
    payload_len = struct.unpack_from("<Q", data, 40)[0]
    head = bytearray(data[:60])
    struct.pack_into("<HI", head, 10, minor, 0)  # minor, flags
    struct.pack_into("<II", head, 52, kind, 0)
    return bytes(head) + struct.pack("<I", zlib.crc32(head)) + data[64 : 64 + payload_len] + trailing


@pytest.fixture(scope="module", params=[64, 40, 256], ids=lambda b: f"{b}bits")
def case(request, tmp_path_factory):
    """An index written by HashIndex (with ties: repeated codes) and queries, as files."""
    bits = request.param
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 256, (N, bits // 8), dtype=np.uint8)
    codes[N // 2 :: 7] = codes[3]  # many codes at the same distance from every query
    index = HashIndex(bits)
    index.add(codes, ids=rng.choice(10**12, N, replace=False))
    queries = rng.integers(0, 256, (5, bits // 8), dtype=np.uint8)
    queries[1] = codes[3]
    out = tmp_path_factory.mktemp(f"index{bits}")
    index.save(out / "flat.cmhidx")
    (out / "queries.bin").write_bytes(queries.tobytes())
    return index, queries, out / "flat.cmhidx", out / "queries.bin"


def run(exe, *args, prefix=(), env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(exe), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def rows(proc: subprocess.CompletedProcess) -> list[tuple[int, ...]]:
    assert proc.returncode == 0, proc.stderr
    return [tuple(map(int, line.split())) for line in proc.stdout.splitlines()]


def knn_rows(index: HashIndex, queries, k: int) -> list[tuple[int, ...]]:
    dist, ids = index.search(queries, k)
    return [(q, r, int(ids[q, r]), int(dist[q, r])) for q in range(len(queries)) for r in range(k) if ids[q, r] >= 0]


def range_rows(index: HashIndex, queries, radius: int) -> list[tuple[int, ...]]:
    lims, dist, ids = index.range_search(queries, radius)
    return [(q, j - lims[q], int(ids[j]), int(dist[j])) for q in range(len(queries)) for j in range(lims[q], lims[q + 1])]


def test_example_matches_hashindex(build, case):
    index, queries, path, qfile = case
    exe = build / "cmhash-search"
    for k in (1, 7, N + 3):  # k > count: the padding rows are left out
        expected = knn_rows(index, queries, k)
        assert len(expected) == len(queries) * min(k, N)
        for threads in (1, 2):
            assert rows(run(exe, "-t", threads, path, qfile, k)) == expected
    assert rows(run(exe, "-v", path, qfile, 7)) == knn_rows(index, queries, 7)
    radius = index.bits * 3 // 8  # a few dozen hits per query, ties included
    expected = range_rows(index, queries, radius)
    assert len(queries) < len(expected) < len(queries) * N // 4
    for threads in (1, 2):
        assert rows(run(exe, "-t", threads, "-r", radius, path, qfile)) == expected


def test_every_simd_level_gives_the_same_results(build, case):
    """CMHASH_SIMD pins the kernels as for the Python package; a level the CPU cannot run
    is an error, never a silent fallback."""
    index, queries, path, qfile = case
    expected = knn_rows(index, queries, 9)
    for level in h.simd_levels():
        assert rows(run(build / "cmhash-search", path, qfile, 9, env={"CMHASH_SIMD": level})) == expected, level
    proc = run(build / "cmhash-search", path, qfile, 9, env={"CMHASH_SIMD": "sse9"})
    assert proc.returncode == STATUS["SIMD"] and "CMHASH_SIMD=sse9" in proc.stderr and not proc.stdout


def test_format_1_1_sections_are_ignored(build, case, tmp_path):
    index, queries, path, qfile = case
    exe = build / "cmhash-search"
    data = path.read_bytes()
    section = b"SECTION\x00" + bytes(range(256)) * 3
    expected = knn_rows(index, queries, 5)
    for kind in (0, 1):  # flat, mih: the library scans the codes either way
        (tmp_path / "v11.cmhidx").write_bytes(with_header(data, 1, kind, section))
        assert rows(run(exe, "-v", tmp_path / "v11.cmhidx", qfile, 5)) == expected
    # A 1.0 file ends with its ids; a 1.1 file shorter than its payload is truncated.
    (tmp_path / "v10.cmhidx").write_bytes(with_header(data, 0, 0, section))
    proc = run(exe, tmp_path / "v10.cmhidx", qfile, 5)
    assert proc.returncode == STATUS["HEADER"] and "unexpected bytes after the payload" in proc.stderr
    (tmp_path / "short.cmhidx").write_bytes(with_header(data, 1)[:-1])
    proc = run(exe, tmp_path / "short.cmhidx", qfile, 5)
    assert proc.returncode == STATUS["TRUNCATED"] and "truncated" in proc.stderr and not proc.stdout


def test_example_usage_errors(build, case):
    _, _, path, qfile = case
    exe = build / "cmhash-search"
    for args in [(path, qfile), (path, qfile, 0), (path, qfile, "x"), ("-r", -1, path, qfile), ("-q", path, qfile, 3)]:
        proc = run(exe, *args)
        assert proc.returncode == 64 and "usage: cmhash-search" in proc.stderr, args
    proc = run(exe, path, path.parent / "missing.bin", 3)
    assert proc.returncode == STATUS["IO"] and "missing.bin" in proc.stderr
    proc = run(exe, path.parent / "missing.cmhidx", qfile, 3)
    assert proc.returncode == STATUS["IO"] and "missing.cmhidx" in proc.stderr


def ptr(arr: np.ndarray, ctype):
    """A C pointer to a C-contiguous array (NULL when empty)."""
    assert arr.flags.c_contiguous
    return arr.ctypes.data_as(ctypes.POINTER(ctype)) if arr.size else None


class RangeResult(ctypes.Structure):
    _fields_ = [("nq", ctypes.c_size_t), ("total", ctypes.c_size_t), ("lims", ctypes.POINTER(ctypes.c_int64)),
                ("distances", ctypes.POINTER(ctypes.c_int32)), ("ids", ctypes.POINTER(ctypes.c_int64))]


class Lib:
    """libcmhash.so through ctypes, with the signatures of cmhash.h. ctypes releases the
    GIL during each call, so Python threads call it in parallel."""

    def __init__(self, path: Path):
        lib = self.lib = ctypes.CDLL(str(path))
        p, sz, u8p = ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint8)
        lib.cmhash_strerror.restype = lib.cmhash_last_error.restype = lib.cmhash_simd_level.restype = ctypes.c_char_p
        lib.cmhash_index_open.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.POINTER(p)]
        lib.cmhash_index_close.argtypes = [p]
        lib.cmhash_index_bits.argtypes = lib.cmhash_index_count.argtypes = lib.cmhash_index_version.argtypes = [p]
        lib.cmhash_index_count.restype = ctypes.c_uint64
        lib.cmhash_knn.argtypes = [p, u8p, sz, sz, sz, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64)]
        lib.cmhash_range.argtypes = [p, u8p, sz, sz, sz, ctypes.POINTER(ctypes.POINTER(RangeResult))]
        lib.cmhash_range_result_free.argtypes = [ctypes.POINTER(RangeResult)]
        lib.cmhash_distances.argtypes = [u8p, sz, u8p, sz, sz, sz, ctypes.POINTER(ctypes.c_int32)]

    def error(self) -> str:
        return self.lib.cmhash_last_error().decode()

    def open(self, path, flags: int = 1) -> tuple[int, ctypes.c_void_p]:
        idx = ctypes.c_void_p(1)
        return self.lib.cmhash_index_open(os.fsencode(path), flags, ctypes.byref(idx)), idx

    def knn(self, idx, queries: np.ndarray, k: int, threads: int = 2):
        dist = np.zeros((len(queries), k), np.int32)
        ids = np.zeros((len(queries), k), np.int64)
        rc = self.lib.cmhash_knn(idx, ptr(queries, ctypes.c_uint8), len(queries), k, threads,
                                 ptr(dist, ctypes.c_int32), ptr(ids, ctypes.c_int64))
        return rc, dist, ids

    def range(self, idx, queries: np.ndarray, radius: int):
        res = ctypes.POINTER(RangeResult)()
        rc = self.lib.cmhash_range(idx, ptr(queries, ctypes.c_uint8), len(queries), radius, 2, ctypes.byref(res))
        if rc:
            return rc, None
        r = res.contents
        lims = np.ctypeslib.as_array(r.lims, (r.nq + 1,)).copy()
        found = (np.ctypeslib.as_array(r.distances, (r.total,)).copy() if r.total else np.zeros(0, np.int32),
                 np.ctypeslib.as_array(r.ids, (r.total,)).copy() if r.total else np.zeros(0, np.int64))
        assert r.total == lims[-1]
        self.lib.cmhash_range_result_free(res)
        return rc, (lims, *found)


def test_shared_library(build, case):
    index, queries, path, _ = case
    lib = Lib(build / "libcmhash.so")
    assert lib.lib.cmhash_simd_level().decode() == h.get_simd_level()
    assert [lib.lib.cmhash_strerror(code).decode() for code in (0, 6, 99)] == [
        "success", "index file truncated", "unknown status code"]
    rc, idx = lib.open(path)
    assert rc == 0, lib.error()
    try:
        assert (lib.lib.cmhash_index_bits(idx), lib.lib.cmhash_index_count(idx)) == (index.bits, N)
        assert lib.lib.cmhash_index_version(idx) in (100, 101)
        for k in (4, N + 2):
            rc, dist, ids = lib.knn(idx, queries, k)
            want_dist, want_ids = index.search(queries, k)
            assert rc == 0 and np.array_equal(dist, want_dist) and np.array_equal(ids, want_ids)
        for radius in (0, index.bits * 3 // 8):
            rc, got = lib.range(idx, queries, radius)
            assert rc == 0 and all(np.array_equal(a, b) for a, b in zip(got, index.range_search(queries, radius)))
        assert lib.knn(idx, queries[:0], 3)[0] == 0  # no queries: nothing to do
        assert lib.range(idx, queries[:0], 3)[1][0].tolist() == [0]
        assert lib.knn(idx, queries, 0)[0] == STATUS["ARGUMENT"] and "k must be >= 1" in lib.error()
        one_d, one_i = np.zeros(1, np.int32), np.zeros(1, np.int64)  # refused before anything is written
        rc = lib.lib.cmhash_knn(idx, ptr(queries, ctypes.c_uint8), len(queries), 2**62, 1, ptr(one_d, ctypes.c_int32),
                                ptr(one_i, ctypes.c_int64))
        assert rc == STATUS["ARGUMENT"] and "do not fit in memory" in lib.error()
    finally:
        lib.lib.cmhash_index_close(idx)
    rc, idx = lib.open(path.parent / "missing.cmhidx")
    assert rc == STATUS["IO"] and idx.value is None and "missing.cmhidx" in lib.error()
    assert lib.open(path, flags=2)[0] == STATUS["ARGUMENT"] and "unknown flags" in lib.error()
    codes = np.ascontiguousarray(index.codes)
    out = np.zeros((len(queries), len(codes)), np.int32)
    rc = lib.lib.cmhash_distances(ptr(queries, ctypes.c_uint8), len(queries), ptr(codes, ctypes.c_uint8), len(codes),
                                  index.bits // 8, 0, ptr(out, ctypes.c_int32))
    assert rc == 0 and np.array_equal(out, hamming_distances(queries, codes))
    assert lib.lib.cmhash_distances(None, 0, None, 0, 0, 1, None) == STATUS["ARGUMENT"] and "nbytes" in lib.error()


def test_threads_share_an_open_index(build, case):
    """Threads search one open index at once, and each sees its own error messages."""
    index, queries, path, _ = case
    lib = Lib(build / "libcmhash.so")
    rc, idx = lib.open(path)
    assert rc == 0, lib.error()
    want = index.search(queries, 6)

    def task(i: int):
        if i % 3 == 0:  # a failing call, then its message on this thread
            rc = lib.open(path.parent / f"missing{i}.cmhidx")[0]
            return rc, lib.error()
        rc, dist, ids = lib.knn(idx, queries, 6, threads=1 + i % 2)
        return rc, np.array_equal(dist, want[0]) and np.array_equal(ids, want[1])

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(task, range(60)))
    finally:
        lib.lib.cmhash_index_close(idx)
    for i, (rc, got) in enumerate(results):
        assert (rc, got) == ((STATUS["IO"], got) if i % 3 == 0 else (0, True)), i
        if i % 3 == 0:
            assert got.startswith(str(path.parent / f"missing{i}.cmhidx") + ":"), got


def test_install(build, tmp_path):
    make(build, "install", f"PREFIX={tmp_path}")
    installed = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert installed == ["bin/cmhash-search", "include/cmhash.h", "lib/libcmhash.a", "lib/libcmhash.so"]


def test_arm64_build_under_qemu(arm64_build, case, tmp_path):
    """The ARM64 build against the index written here on x86-64: the same results, with
    the NEON and the portable kernels."""
    index, queries, path, qfile = case
    exe, qemu = arm64_build / "cmhash-search", ["qemu-aarch64"]
    assert (arm64_build / "libcmhash.so").is_file() and (arm64_build / "libcmhash.a").is_file()
    expected = knn_rows(index, queries, 6)
    for level in ("neon", "generic"):
        assert rows(run(exe, "-v", path, qfile, 6, prefix=qemu, env={"CMHASH_SIMD": level})) == expected, level
    radius = index.bits * 3 // 8
    assert rows(run(exe, "-r", radius, path, qfile, prefix=qemu)) == range_rows(index, queries, radius)
    (tmp_path / "v11.cmhidx").write_bytes(with_header(path.read_bytes(), 1, 1, b"MIH tables"))
    assert rows(run(exe, tmp_path / "v11.cmhidx", qfile, 6, prefix=qemu)) == expected
    proc = run(exe, path, qfile, 6, prefix=qemu, env={"CMHASH_SIMD": "avx2"})  # x86-only level
    assert proc.returncode == STATUS["SIMD"], proc.stderr
