"""Codes as Parquet: the one file layout engines (Spark, Ray, DuckDB) and databases (Milvus bulk
import) read and write.

Layout (``FORMAT = "cmhash-codes/1"``)::

    id    int64                       not null   the item's id (its position in the input for cmhash encode)
    name  string                      nullable   the source name or path
    code  fixed_size_binary(bits/8)   not null   the packed code, as cmhash packs it

    schema metadata (bytes keys and values):
    cmhash.format               b"cmhash-codes/1"
    cmhash.bits                 the code length, e.g. b"64"
    cmhash.bitorder             b"little" (bit i of a code is bit i % 8 of byte i // 8) or b"big"
    cmhash.bundle_fingerprint   the bundle's fingerprint, when known

Errors of an encoding job use :data:`ERRORS_SCHEMA` (id, item, reason), the fields of
``errors.jsonl``. A data set may be one file or a folder of parts (``*.parquet``, read in name
order), as Spark and Ray write them.

pyarrow (and fsspec, for URLs such as ``s3://``) are optional: ``pip install "cmhash-sdk[parquet]"``.
They are imported when a function here is called, never by ``import cmhash``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .codes import BIT_ORDER, as_packed, check_bitorder, check_bits, convert_bitorder
from .errors import CodesFileError, InvalidArgumentError, MissingExtraError
from .files import atomic_path
from .limits import check_input_size

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

__all__ = ["FORMAT", "CodeColumns", "codes_schema", "codes_table", "ERRORS_SCHEMA", "errors_table",
           "write_table", "write_tables", "read_codes", "read_errors", "milvus_table"]

FORMAT = "cmhash-codes/1"
KEY_FORMAT = b"cmhash.format"
KEY_BITS = b"cmhash.bits"
KEY_FINGERPRINT = b"cmhash.bundle_fingerprint"
KEY_BITORDER = b"cmhash.bitorder"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError('Parquet codes need pyarrow: pip install "cmhash-sdk[parquet]"') from None
    return pa, pq


def _is_url(path) -> bool:
    return isinstance(path, str) and "://" in path


def _filesystem(path_or_url, filesystem):
    """(filesystem or None, path): an fsspec filesystem for a URL, the given one, or None for a local path."""
    if filesystem is not None or not _is_url(path_or_url):
        return filesystem, os.fspath(path_or_url)
    try:
        import fsspec
    except ImportError:
        raise MissingExtraError(f'{path_or_url}: URLs need fsspec: pip install "cmhash-sdk[parquet]"') from None
    return fsspec.core.url_to_fs(path_or_url)


@dataclass
class CodeColumns:
    """Codes read from a file, with what the file says about them.

    Attributes:
        codes: uint8 (n, bits/8), packed least significant bit first (cmhash's order, whatever
            the file's); read-only when it is a view of Arrow's buffer.
        ids: int64 (n,), or None when the file has no ids (a bare ``.npy``, a Parquet file
            without an ``id`` column): ``HashIndex.add`` then numbers the codes.
        names: one ``str`` (or None) per code, or None when the file has no names.
        bits: the code length.
        bundle_fingerprint: the fingerprint of the bundle that made the codes, when recorded.
        bitorder: the order the file stores its bits in; ``codes`` are always ``"little"``.
    """

    codes: np.ndarray
    ids: np.ndarray | None
    names: list | None
    bits: int
    bundle_fingerprint: str | None = None
    bitorder: str = BIT_ORDER

    def __len__(self) -> int:
        return self.codes.shape[0]


def codes_schema(bits: int, *, bundle_fingerprint: str | None = None, bitorder: str = BIT_ORDER) -> "pa.Schema":
    """The Arrow schema of a codes file of ``bits``-bit codes (see the module docstring)."""
    pa, _ = _pyarrow()
    bits = check_bits(bits, "codes_schema: bits", InvalidArgumentError)
    check_bitorder(bitorder, "codes_schema")
    metadata = {KEY_FORMAT: FORMAT.encode(), KEY_BITS: str(bits).encode(), KEY_BITORDER: bitorder.encode()}
    if bundle_fingerprint is not None:
        if not isinstance(bundle_fingerprint, str) or not bundle_fingerprint:
            raise InvalidArgumentError(f"codes_schema: bundle_fingerprint must be a non-empty str, got {bundle_fingerprint!r}")
        metadata[KEY_FINGERPRINT] = bundle_fingerprint.encode()
    return pa.schema(
        [pa.field("id", pa.int64(), nullable=False), pa.field("name", pa.string()),
         pa.field("code", pa.binary(bits // 8), nullable=False)],
        metadata=metadata,
    )


def codes_table(ids, codes, names=None, *, bits: int | None = None, bundle_fingerprint: str | None = None,
                bitorder: str = BIT_ORDER) -> "pa.Table":
    """An Arrow table of :func:`codes_schema` from packed codes.

    Args:
        ids: int64-compatible (n,). codes: packed uint8 (n, bits/8), in ``bitorder``
            (cmhash's own codes are little). names: n strings (or None), or None.
        bits: checked against the codes' width when given.

    Raises:
        CodeFormatError: codes that are not packed uint8 of the expected width.
        InvalidArgumentError: ids or names of another length, ids that are not integers.
    """
    pa, _ = _pyarrow()
    codes = as_packed(codes, "codes_table", "codes", bits=bits)
    n, width = codes.shape
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise InvalidArgumentError(f"codes_table: ids must be 1-D with one id per code ({n}), got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        raise InvalidArgumentError(f"codes_table: ids must be integers, got dtype {ids.dtype}")
    if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise InvalidArgumentError("codes_table: ids must fit in int64")
    schema = codes_schema(width * 8, bundle_fingerprint=bundle_fingerprint, bitorder=bitorder)
    # The codes' bytes become the column's data buffer as they are: no copy per row.
    code_array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(codes)])
    if names is None:
        name_array = pa.nulls(n, pa.string())
    else:
        names = list(names)
        if len(names) != n:
            raise InvalidArgumentError(f"codes_table: got {len(names)} names for {n} codes")
        name_array = pa.array([None if x is None else str(x) for x in names], pa.string())
    return pa.Table.from_arrays([pa.array(ids.astype(np.int64), pa.int64()), name_array, code_array], schema=schema)


ERRORS_FIELDS = (("id", "int64"), ("item", "string"), ("reason", "string"))


def _errors_schema():
    pa, _ = _pyarrow()
    return pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("item", pa.string()),
                      pa.field("reason", pa.string())], metadata={KEY_FORMAT: FORMAT.encode()})


def __getattr__(name: str):
    # ERRORS_SCHEMA is an Arrow object: built on first use, so this module imports without pyarrow.
    if name == "ERRORS_SCHEMA":
        return _errors_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def errors_table(rows: list[dict]) -> "pa.Table":
    """The items an encoding job could not encode, as ``errors.jsonl`` lists them
    (``{"id": int, "item": str, "reason": str}`` per row), as an Arrow table."""
    pa, _ = _pyarrow()
    columns: dict[str, list[Any]] = {"id": [], "item": [], "reason": []}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(columns):
            raise InvalidArgumentError(f"errors_table: row {i} must be a dict with keys id, item, reason, got {row!r}")
        for key in columns:
            columns[key].append(row[key])
    return pa.Table.from_pydict(columns, schema=_errors_schema())


def write_table(table: "pa.Table", path_or_url, *, filesystem=None) -> None:
    """Write an Arrow table as one Parquet file: :func:`write_tables` of the one table."""
    write_tables([table], path_or_url, schema=table.schema, filesystem=filesystem)


def write_tables(tables: Iterable["pa.Table"], path_or_url, *, schema: "pa.Schema", filesystem=None) -> None:
    """Write Arrow tables of one ``schema`` as one Parquet file, a row group (or more) per
    table, one table in memory at a time (``tables`` may be a generator).

    A local path is written atomically (a temporary file beside it, then ``os.replace``): a
    crash leaves the previous file whole. Every page carries a CRC-32, which :func:`read_codes`
    verifies, so a corrupted file is an error rather than other codes. A URL (``s3://...``, ``gs://...``) goes through
    fsspec, or through ``filesystem`` (an fsspec or pyarrow filesystem) when given; there
    the store's own put is what makes the file appear whole.
    """
    _, pq = _pyarrow()
    fs, path = _filesystem(path_or_url, filesystem)
    with (contextlib.nullcontext(path) if fs is not None else atomic_path(path)) as target, \
            pq.ParquetWriter(str(target), schema, filesystem=fs, write_page_checksum=True) as writer:
        for table in tables:
            writer.write_table(table)


def _parts(path: str, fs) -> list[str]:
    """The files of a data set: ``path`` itself, or the ``*.parquet`` files of a folder by name."""
    isdir = fs.isdir(path) if fs is not None else os.path.isdir(path)
    if not isdir:
        exists = fs.exists(path) if fs is not None else os.path.isfile(path)
        if not exists:
            raise CodesFileError(f"{path}: no such file or folder; give a Parquet file or a folder of *.parquet parts")
        return [path]
    if fs is not None:
        names = [p for p in fs.ls(path, detail=False) if p.endswith(".parquet")]
    else:
        names = [os.path.join(path, n) for n in os.listdir(path) if n.endswith(".parquet") and not n.startswith(".")]
    if not names:
        raise CodesFileError(f"{path}: the folder holds no *.parquet parts")
    return sorted(names, key=os.path.basename)


def _meta(schema, key: bytes) -> str | None:
    value = (schema.metadata or {}).get(key)
    try:
        return value.decode() if value is not None else None
    except UnicodeDecodeError:
        raise CodesFileError(f"the metadata value of {key.decode()} is not UTF-8; the file is damaged") from None


def _part_info(path: str, schema, first_code: bytes | None = None) -> dict:
    """bits, bitorder and fingerprint of one part, from its schema, checked. A variable-length
    ``binary`` code column (what Spark writes, and Milvus reads) takes its width from the
    metadata, else from ``first_code``; bits is None for such a part with no rows."""
    pa, _ = _pyarrow()
    if "code" not in schema.names:
        raise CodesFileError(f"{path}: no 'code' column (it has {schema.names}); cmhash codes files have id, name, code")
    code_type = schema.field("code").type
    declared = _meta(schema, KEY_BITS)
    if pa.types.is_fixed_size_binary(code_type):
        bits = code_type.byte_width * 8
    elif pa.types.is_binary(code_type) or pa.types.is_large_binary(code_type):
        bits = int(declared) if declared is not None and declared.isdigit() else \
            None if first_code is None else len(first_code) * 8
    else:
        raise CodesFileError(f"{path}: the 'code' column is {code_type}, not fixed_size_binary(bits/8) or binary; "
                             "write codes with cmhash.parquet.codes_table")
    if bits is not None:
        check_bits(bits, f"{path}: the code length", CodesFileError)
    if declared is not None and declared != str(bits):
        raise CodesFileError(f"{path}: the metadata says {declared}-bit codes but the 'code' column holds "
                             f"{bits}-bit codes; the file is inconsistent, write it again")
    bitorder = _meta(schema, KEY_BITORDER) or BIT_ORDER
    if bitorder not in ("little", "big"):
        raise CodesFileError(f"{path}: unknown bit order {bitorder!r} in the metadata (little or big)")
    fmt = _meta(schema, KEY_FORMAT)
    if fmt is not None and fmt != FORMAT:
        raise CodesFileError(f"{path}: format {fmt!r} is not one this cmhash reads ({FORMAT!r}); upgrade cmhash")
    for column, check in (("id", pa.types.is_integer), ("name", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t))):
        if column in schema.names and not check(schema.field(column).type):
            raise CodesFileError(f"{path}: the '{column}' column is {schema.field(column).type}; "
                                 f"it must be {'int64' if column == 'id' else 'string'}")
    return {"bits": bits, "bitorder": bitorder, "bundle_fingerprint": _meta(schema, KEY_FINGERPRINT),
            "has_ids": "id" in schema.names, "has_names": "name" in schema.names}


def _codes_view(column, width: int) -> np.ndarray:
    """The (n, width) uint8 codes of a fixed_size_binary column: a view of Arrow's data buffer
    when it is one chunk (no copy), the chunks' bytes joined otherwise."""
    chunks = column.chunks if hasattr(column, "chunks") else [column]
    views = []
    for chunk in chunks:
        if chunk.null_count:
            raise CodesFileError("a codes file holds null codes; every row needs a code")
        data = chunk.buffers()[1]
        start = chunk.offset * width
        views.append(np.frombuffer(data, dtype=np.uint8, count=len(chunk) * width, offset=start) if len(chunk)
                     else np.empty(0, np.uint8))
    flat = views[0] if len(views) == 1 else np.concatenate(views) if views else np.empty(0, np.uint8)
    return flat.reshape(-1, width)


def read_codes(path_or_url, *, filesystem=None, memory_map: bool = True) -> CodeColumns:
    """Read a codes file or a folder of parts written with :func:`codes_table` (or by any tool
    that writes the same columns: ``code`` is required, ``id`` and ``name`` are optional).

    Args:
        path_or_url: a ``.parquet`` file, a folder of ``*.parquet`` parts (read in name order,
            as one), or a URL when fsspec is installed.
        filesystem: an fsspec or pyarrow filesystem to read ``path_or_url`` from.
        memory_map: map local files instead of reading them (Arrow decodes pages either way;
            a one-chunk code column is then handed over without a further copy).

    Returns:
        :class:`CodeColumns`; ``codes`` are in cmhash's bit order (converted when the file says
        ``big``), ``names`` a list of str/None (None when no part has a ``name`` column).

    Raises:
        CodesFileError: a missing or mistyped column, null codes or ids, or parts that disagree
            on bit length, bit order or bundle fingerprint.
        ResourceLimitError: codes over ``cmhash.limits.MAX_INPUT_BYTES`` (checked before reading).
    """
    pa, pq = _pyarrow()
    fs, path = _filesystem(path_or_url, filesystem)
    parts = _parts(path, fs)
    infos, files = [], []
    total = 0
    for part in parts:
        try:
            pf = pq.ParquetFile(part, memory_map=memory_map and fs is None, filesystem=fs,
                                page_checksum_verification=True)
            first_code = None
            if "code" in pf.schema_arrow.names and not pa.types.is_fixed_size_binary(pf.schema_arrow.field("code").type) \
                    and pf.metadata.num_rows:
                first_code = next(pf.iter_batches(batch_size=1, columns=["code"])).column(0)[0].as_py()
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise CodesFileError(f"{part}: not a readable Parquet file ({exc})") from None
        info = _part_info(part, pf.schema_arrow, first_code)
        total += pf.metadata.num_rows * (info["bits"] or 0) // 8
        infos.append(info)
        files.append(pf)
    known = [(part, info) for part, info in zip(parts, infos) if info["bits"] is not None]
    if not known:
        raise CodesFileError(f"{path}: no rows and no recorded bit length; nothing to read codes of")
    first_part, first = known[0]
    for part, info in zip(parts, infos):
        if info["bits"] is None:  # an empty part of variable-length codes: any length fits
            info["bits"] = first["bits"]
        for key in ("bits", "bitorder", "bundle_fingerprint", "has_ids"):
            if info[key] != first[key]:
                raise CodesFileError(f"{path}: the parts disagree on {key.replace('has_ids', 'having an id column')}: "
                                     f"{first_part} has {first[key]!r}, {part} has {info[key]!r}; "
                                     "codes of one data set come from one bundle and writer")
    check_input_size(f"{path}: codes", total)
    width = first["bits"] // 8
    columns = ["code"] + (["id"] if first["has_ids"] else []) + (["name"] if any(i["has_names"] for i in infos) else [])
    tables = []
    try:
        for pf, info in zip(files, infos):
            table = pf.read(columns=[c for c in columns if c != "name" or info["has_names"]])
            if "name" in columns and not info["has_names"]:
                table = table.append_column("name", pa.nulls(table.num_rows, pa.string()))
            code = table.column("code")
            if not pa.types.is_fixed_size_binary(code.type):
                table = table.set_column(table.schema.get_field_index("code"), "code", code.cast(pa.binary(width)))
            tables.append(table.select(columns))
    except (pa.ArrowException, OSError) as exc:  # Arrow reports damaged pages and checksums as OSError
        raise CodesFileError(f"{path}: a part is damaged or holds codes of different lengths ({exc}); "
                             "write it again") from None
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    codes = _codes_view(table.column("code"), width)
    codes.flags.writeable = False
    if first["bitorder"] != BIT_ORDER:
        codes = convert_bitorder(codes, first["bitorder"], BIT_ORDER)
    ids = None
    if first["has_ids"]:
        id_column = table.column("id")
        if id_column.null_count:
            raise CodesFileError(f"{path}: the 'id' column holds nulls; every code needs an id")
        ids = id_column.to_numpy() if table.num_rows else np.empty(0, np.int64)
        if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
            raise CodesFileError(f"{path}: ids over 2**63 - 1; cmhash ids are int64")
        ids = ids.astype(np.int64, copy=False)
    names = table.column("name").to_pylist() if "name" in columns else None
    return CodeColumns(codes=codes, ids=ids, names=names, bits=first["bits"],
                       bundle_fingerprint=first["bundle_fingerprint"], bitorder=first["bitorder"])


def milvus_table(table: "pa.Table", *, vector_field: str = "code", names: bool = True) -> "pa.Table":
    """A codes table (:func:`codes_table`) as Milvus bulk import takes it for a ``BINARY_VECTOR``
    field: the same rows and bytes, the code column as variable-length ``binary`` (Milvus's
    Parquet reader takes ``binary`` or ``list<uint8>`` for binary vectors, not
    ``fixed_size_binary``) named ``vector_field``; without ``names`` the name column is left
    out (Milvus refuses columns its collection has no field for). Codes must be little bit
    order, Milvus's. See docs/interop.md for the collection schema and the import steps."""
    pa, _ = _pyarrow()
    info = _part_info("milvus_table", table.schema)
    if info["bitorder"] != BIT_ORDER:
        raise InvalidArgumentError("milvus_table: Milvus reads bit i of a vector from bit i % 8 of byte i // 8 "
                                   "(little bit order); write the table with bitorder='little'")
    if not info["has_ids"]:
        raise InvalidArgumentError("milvus_table: the table has no 'id' column (Milvus's primary key)")
    columns = [pa.field("id", pa.int64(), nullable=False)]
    arrays = [table.column("id")]
    if names and info["has_names"]:
        columns.append(pa.field("name", pa.string()))
        arrays.append(table.column("name"))
    columns.append(pa.field(vector_field, pa.binary(), nullable=False))
    arrays.append(table.column("code").cast(pa.binary()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(columns, metadata=table.schema.metadata))


def read_errors(path_or_url, *, filesystem=None) -> list[dict]:
    """The rows of an errors file written with :func:`errors_table` (id, item, reason)."""
    pa, pq = _pyarrow()
    fs, path = _filesystem(path_or_url, filesystem)
    try:
        table = pq.read_table(path, filesystem=fs, columns=["id", "item", "reason"])
    except (pa.ArrowException, KeyError) as exc:
        raise CodesFileError(f"{path}: not a readable errors file ({exc})") from None
    return table.to_pylist()

