# Type stub of the C extension cmhash._hamming (native/). Arrays are any C-contiguous
# buffer of the stated dtype; outputs are preallocated by the caller. threads=0: all CPUs.
from collections.abc import Buffer, Sequence
from typing import TypedDict

class _SysInfo(TypedDict):
    simd_levels: list[str]
    simd_level: str
    simd_best: str
    cpu_count: int
    max_code_bytes: int
    max_bits: int

def simd_levels() -> list[str]: ...
def get_simd_level() -> str: ...
def set_simd_level(name: str, /) -> None: ...
def sysinfo() -> _SysInfo: ...
def distances(queries: Buffer, db: Buffer, out: Buffer, threads: int = 0) -> None: ...
def knn(queries: Buffer, db: Buffer, k: int, out_distances: Buffer, out_labels: Buffer, threads: int = 0) -> None: ...
def range_search(queries: Buffer, db: Buffer, radius: int, threads: int = 0) -> tuple[bytearray, bytearray, bytearray]: ...
def rank_metrics(
    q_codes: Buffer, db_codes: Buffer, q_labels: Buffer, db_labels: Buffer,
    map_ks: Sequence[int], prec_ks: Sequence[int], hist_all: Buffer, hist_rel: Buffer,
    ap: Buffer, prec: Buffer, threads: int = 0,
) -> None: ...
def mih_build(
    db: Buffer, start: Buffer, width: Buffer, offsets: Buffer, perm: Buffer, ranks: Buffer, ordered: Buffer, /
) -> None: ...
def mih_knn(
    queries: Buffer, db: Buffer, start: Buffer, width: Buffer, offsets: Buffer, perm: Buffer, ranks: Buffer,
    ordered: Buffer, n_tab: int, k: int, max_work: int, out_distances: Buffer, out_labels: Buffer, stats: Buffer,
    threads: int = 0,
) -> None: ...
def mih_range(
    queries: Buffer, db: Buffer, start: Buffer, width: Buffer, offsets: Buffer, perm: Buffer, ranks: Buffer,
    ordered: Buffer, n_tab: int, radius: int, max_work: int, threads: int = 0,
) -> tuple[bytearray, bytearray, bytearray, bytearray]: ...
