"""The ``cmhash`` command line: one entry point, a subcommand per library call.

``main(argv)`` takes its arguments as a list, so tests call it directly.

Where commands come from. The runtime's own commands (encode, index, search, bench) are
defined here. Commands that run training or export code (train, eval, demo, export) are
defined beside that code, in ``cmhash.training.cli`` and ``cmhash.export.cli``, and declared
in the ``cmhash.commands`` entry-point group of pyproject.toml::

    [project.entry-points."cmhash.commands"]
    train = "cmhash.training.cli:add_train"

This module finds them with ``importlib.metadata`` and never names them, so the runtime
imports no layer above it (tests/test_layers.py holds that), and any installed package can
add a command the same way. An entry point names a function ``add(subparsers)`` that adds
one subparser, called as the entry point, whose ``func`` default runs the command and
returns the exit status. Those modules import only the runtime at import time, so
``cmhash --help`` lists every command even without the extras; the command itself says
which extra to install (:func:`require_extra`).

The ``cmhash.bench_baselines`` group works alike for ``cmhash bench --checkpoint``: each
entry names a function ``(checkpoint, *, modalities, batch_sizes, warmup, repeats, threads) -> rows``
that times the checkpoint's own towers (the PyTorch eager baseline, which the export extra registers).
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import importlib.util
import json
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .backends import BACKENDS
from .bundle import VARIANTS
from .cpus import quiet_openmp_waits
from .errors import CmhashError
from .limits import check_input_size

COMMAND_GROUP = "cmhash.commands"
BASELINE_GROUP = "cmhash.bench_baselines"


def print_json(obj) -> None:
    """A command's result on stdout as one JSON object (``--json``)."""
    print(json.dumps(obj, indent=2, sort_keys=True))


def setup_logging(quiet: bool) -> None:
    """Progress messages on stderr (INFO), or warnings only when ``quiet``."""
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")


def require_extra(extra: str, *modules: str, needed_by: str = "this command") -> None:
    """Raise a one-line :class:`CmhashError` that names the pip extra to install when one of
    ``modules`` (import names) is missing; a command calls it before importing its code."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        what = missing[0] if len(missing) == 1 else f"{missing[0]} and {len(missing) - 1} more"
        raise CmhashError(f"{what} not installed; {needed_by} needs the {extra} extra: "
                          f'pip install "cmhash-sdk[{extra}]"')


def exit_without_extra(extra: str, *modules: str) -> None:
    """:func:`require_extra` for scripts (the examples): its one-line message on stderr and
    exit status 2 instead of a traceback."""
    try:
        require_extra(extra, *modules, needed_by="this script")
    except CmhashError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _load_codes(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Packed codes (and ids, if present) from a ``.npy`` array or an ``.npz`` with
    ``codes`` [and ``ids``] - what ``cmhash encode`` writes. Each array's header is checked
    (no Python objects, 2-D codes, a declared size within ``cmhash.limits.MAX_INPUT_BYTES``)
    before its data is read or inflated."""
    p = Path(path)
    if not p.is_file():
        raise CmhashError(f"{path}: no such file; give a .npy of packed uint8 codes or an .npz with 'codes'")
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if "codes" not in names:
                    raise CmhashError(f"{path}: the .npz has no 'codes' array (it has {sorted(names)})")
                arrays = {}
                for name, ndim in (("codes", 2), ("ids", 1)):
                    if name in names:
                        with zf.open(f"{name}.npy") as fh:
                            arrays[name] = _read_npy(fh, f"{path}: '{name}'", ndim)
                return arrays["codes"], arrays.get("ids")
        with open(p, "rb") as fh:
            return _read_npy(fh, path, 2), None
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        if isinstance(exc, CmhashError):
            raise
        raise CmhashError(f"{path}: not a readable .npy or .npz of packed codes ({exc})") from None


def _read_npy(fh, what: str, ndim: int) -> np.ndarray:
    """One ``ndim``-D array from an open ``.npy`` stream: header checked first, then exactly its data."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise CmhashError(f"{what}: .npy format version {version} is not supported (write it with numpy.save)")
    if dtype.hasobject:
        raise CmhashError(f"{what} holds Python objects (dtype {dtype}), which cmhash never unpickles; "
                          "save a numeric array")
    if len(shape) != ndim:
        raise CmhashError(f"{what} has shape {shape}; codes are 2-D (n, bits/8) and ids 1-D (n,)")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    check_input_size(what, nbytes)
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise CmhashError(f"{what} is truncated: {len(data):,} of {nbytes:,} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def cmd_index(args) -> int:
    from .index import HashIndex

    if args.index_cmd == "build":
        if Path(args.out).exists() and not args.force:
            raise CmhashError(f"{args.out} already exists; pass --force to replace it, or choose another --out")
        codes, ids = _load_codes(args.codes)
        index = HashIndex(codes.shape[1] * 8)
        index.add(codes, ids)
        index.save(args.out)
        info = {"path": args.out, "count": len(index), "bits": index.bits}
    else:
        index = HashIndex.load(args.index, mmap=True)
        info = {"path": args.index, "count": len(index), "bits": index.bits}
    if args.json:
        print_json(info)
    else:
        print(f"{info['path']}: {info['count']} codes of {info['bits']} bits")
    return 0


def cmd_search(args) -> int:
    from .index import HashIndex

    index = HashIndex.load(args.index, mmap=True)
    queries, _ = _load_codes(args.queries)
    t0 = time.perf_counter()
    dist, ids = index.search(queries, args.k)
    seconds = time.perf_counter() - t0
    if args.json:
        print_json({"distances": dist.tolist(), "ids": ids.tolist(), "seconds": seconds})
        return 0
    for qi in range(len(ids)):
        print(f"query {qi}: " + ", ".join(f"{i} ({d})" for i, d in zip(ids[qi], dist[qi]) if i >= 0))
    print(f"{len(ids)} queries, k={args.k}, {seconds * 1e3:.2f} ms", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    """Exit 0 when the chosen variant reproduces the bundle's reference codes here, 1 when
    it does not, 3 when the bundle carries no reference data to check with."""
    from .reference import check_bundle, result_line

    report = check_bundle(args.bundle, backend=args.backend, device=args.device, threads=args.threads,
                          bit_floor=args.bit_floor)
    if report["checkable"] and args.variant not in report["variants"]:
        raise CmhashError(f"{args.bundle} has no {args.variant} variant that {args.backend} runs "
                          f"(checked: {', '.join(report['variants']) or 'none'}); pick another --variant or --backend")
    # the chosen variant passes when it does, and its ORT-format copy too where the bundle has one
    chosen = report["variants"].get(args.variant) and report["ort"].get(args.variant, True)
    report["chosen"] = {"variant": args.variant, "passed": chosen}
    if args.json:
        print_json(report)
    elif not report["checkable"]:
        print(f"cmhash verify: cannot check: {report['reason']}", file=sys.stderr)
    else:
        contract = report["contract"]
        print(f"{args.bundle}: reference codes recomputed on this machine ({report['device']}, backend {args.backend}; "
              f"{', '.join(f'{n} {m}' for m, n in report['items'].items())} items; "
              f"floor {contract['bit_floor']:g} of bits, fp32 {contract['fp32_bit_floor']:g})")
        for r in report["results"]:
            print(result_line(r))
        for variant, why in report["skipped"].items():
            print(f"  {variant:12} not checked: {why}")
        passing = [v for v, ok in report["variants"].items() if ok]
        passing_ort = [v for v, ok in report["ort"].items() if ok]
        print(f"{args.variant}: {'passes' if chosen else 'FAILS'} here; variants that pass: {', '.join(passing) or 'none'}"
              + (f"; ORT-format copies that pass: {', '.join(passing_ort) or 'none'}" if report["ort"] else ""))
    if not report["checkable"]:
        return 3
    return 0 if chosen else 1


def cmd_encode(args) -> int:
    from .offline import Progress, encode_collection

    summary = encode_collection(
        args.bundle,
        args.input,
        args.out,
        modality=args.modality,
        batch_size=args.batch_size,
        workers=args.workers,
        shard=args.shard,
        resume=args.resume,
        chunk_size=args.chunk_size,
        variant=args.variant,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        progress=None if args.json or args.quiet else Progress(),
    )
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['encoded']} of {summary['items']} items encoded into {summary['codes']}; "
              f"{summary['errors']} unreadable (listed in {summary['errors_file']}); "
              f"{summary['items_per_second']:,.1f} items/s")
    return 0


def cmd_providers(args) -> int:
    """The execution providers this machine's onnxruntime offers, and where the others come from."""
    from .backends import PROVIDERS, available_providers

    offered = available_providers()
    known = {full: (short, package) for short, (full, package) in PROVIDERS.items()}
    rows = [{"provider": name, "short": known.get(name, ("", ""))[0], "available": name in offered,
             "package": known.get(name, ("", "built into this onnxruntime"))[1]} for name in [*offered, *(
                 n for n in known if n not in offered)]]
    if args.json:
        print_json({"available": offered, "providers": rows})
        return 0
    for row in rows:
        where = "available" if row["available"] else f"not here: {row['package']}"
        print(f"{row['provider']:28} {row['short']:9} {where}")
    return 0


def cmd_bench(args) -> int:
    from .bench import DEFAULT_BATCH_SIZES, baseline_row, bench_bundle, format_table
    from .bundle import load_bundle

    record = bench_bundle(args.bundle, providers=args.providers, variants=args.variants, modality=args.modality,
                          data=args.data, threads=args.threads, cold_runs=args.cold_runs, warmup=args.warmup,
                          repeats=args.repeats,
                          progress=None if args.json or args.quiet else lambda what: print(f"measuring {what}",
                                                                                            file=sys.stderr))
    checkpoint = args.checkpoint
    if checkpoint is None:
        saved = load_bundle(args.bundle).manifest.get("provenance", {}).get("checkpoint", {}).get("path")
        checkpoint = saved if saved and Path(saved).exists() else None
    baseline = "no checkpoint given" if checkpoint is None else None
    if checkpoint is not None:
        measures = _entry_points(BASELINE_GROUP)
        baseline = None if measures else "no checkpoint baseline installed (it comes with cmhash.export)"
        for name, measure in measures.items():
            try:
                rows = measure(checkpoint, modalities=[record["modality"]], batch_sizes=DEFAULT_BATCH_SIZES,
                               warmup=args.warmup, repeats=args.repeats, threads=args.threads)
                record["rows"].append(baseline_row(rows, record["modality"]))
            except (CmhashError, ImportError) as exc:
                baseline = f"{name}: {exc}"
    record["checkpoint"] = checkpoint
    if baseline:
        record["pytorch_baseline"] = f"skipped: {baseline}"
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print_json(record)
        return 0
    print(format_table(record, markdown=args.markdown))
    threads = f"{args.threads} threads" if args.threads else "all CPUs it may use"
    note = (f"{record['modality']} tower latency; cold start = new process to first code (median of {args.cold_runs}); "
            f"bits and mAP on {record['items']} items of {record['data']}; {record['cpu']}, onnxruntime "
            f"{record['onnxruntime']}, {threads}, load average {record['load_average'][0]}")
    print(f"\n{note}" if not args.markdown else f"\n{note}.")
    if baseline:
        print(f"(PyTorch eager baseline skipped: {baseline})")
    return 0


def _entry_points(group: str) -> dict[str, Callable]:
    """The objects the installed packages register in ``group``, by entry-point name. One
    that cannot be imported becomes a function raising a CmhashError that says why."""
    found: dict[str, Callable] = {}
    for ep in importlib.metadata.entry_points(group=group):
        try:
            found[ep.name] = ep.load()
        except ImportError as exc:
            found[ep.name] = _unloadable(ep, exc)
    return found


def _unloadable(ep: importlib.metadata.EntryPoint, exc: ImportError) -> Callable:
    message = f"cannot load {ep.value}: {exc}"

    def fail(*args, **kwargs):
        raise CmhashError(message)

    if ep.group != COMMAND_GROUP:
        return fail

    def add(sub) -> None:  # still listed by --help; running it says why it cannot run
        parser = sub.add_parser(ep.name, help=f"(unavailable: {message})")
        parser.add_argument("args", nargs=argparse.REMAINDER)
        parser.set_defaults(func=fail)

    return add


def registered_commands() -> dict[str, Callable]:
    """The ``add(subparsers)`` functions of the commands other layers register (``cmhash.commands``)."""
    return _entry_points(COMMAND_GROUP)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _names(text: str) -> list[str]:
    """An argparse type: comma-separated names (``cpu,openvino``)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


class Parser(argparse.ArgumentParser):
    """Usage mistakes in one line on stderr (exit status 2), the usage left to ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cmhash", description="Cross-modal deep hashing toolkit.")
    parser.add_argument("--version", action="version", version=f"cmhash {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = sub.add_parser("index", help="build or inspect a HashIndex file")
    isub = index.add_subparsers(dest="index_cmd", required=True)
    build = isub.add_parser("build", help="index packed codes from .npy / .npz (codes [, ids])")
    build.add_argument("codes", help=".npy of packed uint8 codes, or .npz with 'codes' (and 'ids') as cmhash encode writes")
    build.add_argument("--out", required=True, help="the index file to write")
    build.add_argument("--force", action="store_true", help="replace --out if it exists")
    build.add_argument("--json", action="store_true", help="print one JSON object")
    info = isub.add_parser("info", help="count and bit length of an index file")
    info.add_argument("index", help="an index file written by cmhash index build or HashIndex.save")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="k nearest codes of each query in an index")
    search.add_argument("index", help="an index file")
    search.add_argument("queries", help=".npy of packed uint8 codes or .npz with 'codes'")
    search.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default 10)")
    search.add_argument("--json", action="store_true", help="print distances, ids and seconds as JSON")
    search.set_defaults(func=cmd_search)

    encode = sub.add_parser("encode", help="hash a folder, file list or manifest into codes + ids (resumable)")
    encode.add_argument("bundle", help="a bundle folder or archive written by cmhash export")
    encode.add_argument("input", help="folder, file list (one path or text per line) or manifest (.jsonl/.csv)")
    encode.add_argument("--out", required=True, help="output folder (codes.npz, errors.jsonl, summary.json)")
    encode.add_argument("--modality", choices=["image", "text"], help="default: image when the bundle has it")
    encode.add_argument("--batch-size", type=positive_int, default=32, help="items per model call (default 32)")
    encode.add_argument("--workers", type=positive_int, default=4, help="decoding threads (default 4)")
    encode.add_argument("--shard", default="0/1", help="i/N: encode every N-th item from the i-th (default 0/1)")
    encode.add_argument("--resume", action="store_true", help="continue a killed or finished job in --out")
    encode.add_argument("--chunk-size", type=positive_int, default=1024, help="items per resumable part (default 1024)")
    encode.add_argument("--variant", default="fp32", choices=["fp32", "fp16", "int8", "int8-dynamic"],
                        help="which of the bundle's models to run (default fp32)")
    encode.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="inference backend (default auto)")
    encode.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    encode.add_argument("--threads", type=positive_int, help="onnxruntime threads")
    encode.add_argument("--json", action="store_true", help="print the summary as JSON (no progress line)")
    encode.add_argument("--quiet", action="store_true", help="no progress lines")
    encode.set_defaults(func=cmd_encode)

    verify = sub.add_parser("verify", help="recompute a bundle's reference codes on this machine, per variant")
    verify.add_argument("bundle", help="a bundle folder or archive written by cmhash export")
    verify.add_argument("--variant", default="fp32", choices=VARIANTS, help="the variant whose failure exits 1 (fp32)")
    verify.add_argument("--backend", default="auto", choices=BACKENDS, help="inference backend (default auto)")
    verify.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    verify.add_argument("--threads", type=positive_int, help="onnxruntime threads")
    verify.add_argument("--bit-floor", type=float, help="override the bundle's floor for reduced-precision variants")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify)

    bench = sub.add_parser("bench", help="one row per variant, format and provider: size, cold start, memory, "
                                          "latency, throughput, bits agreeing with fp32, mAP")
    bench.add_argument("bundle", help="a bundle folder or archive")
    bench.add_argument("--providers", type=_names, help="comma-separated onnxruntime providers, a row set each "
                                                        "(default cpu; see cmhash providers)")
    bench.add_argument("--variants", type=_names, help="comma-separated variants (default: all the bundle has)")
    bench.add_argument("--modality", choices=["image", "text"], help="the tower whose latency is timed (default image)")
    bench.add_argument("--data", help="manifest with images, texts or tags and labels: bits and mAP on it "
                                      "(default: the bundle's reference inputs, bits only)")
    bench.add_argument("--cold-runs", type=positive_int, default=3, help="cold starts per row, median (default 3)")
    bench.add_argument("--checkpoint", help="add a PyTorch eager row from this checkpoint (default: the bundle's own, if present)")
    bench.add_argument("--repeats", type=positive_int, default=20, help="timed calls at batch 1 per row (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    bench.add_argument("--threads", type=positive_int, help="CPU threads for onnxruntime and torch")
    bench.add_argument("--out", help="also write the JSON record here")
    bench.add_argument("--json", action="store_true", help="print the record as JSON instead of the table")
    bench.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.set_defaults(func=cmd_bench)

    providers = sub.add_parser("providers", help="the onnxruntime execution providers here, and the packages of the others")
    providers.add_argument("--json", action="store_true", help="print them as JSON")
    providers.set_defaults(func=cmd_providers)

    # commands of the layers above, each defined beside its code (see the module docstring)
    for name, add in sorted(registered_commands().items()):
        if name in sub.choices:
            print(f"cmhash: warning: a registered command {name!r} is ignored: cmhash has its own", file=sys.stderr)
            continue
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_openmp_waits()  # before a command that trains or exports imports torch and its OpenMP runtime
    try:
        return args.func(args)
    # A user's mistake or the machine's state (a bad file, an unwritable or full disk): one
    # line and status 2. Anything else is a bug and keeps its traceback.
    except (CmhashError, OSError) as exc:
        print(f"cmhash {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, CmhashError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}" + (" (is the disk full or a file size limit set?)"
                                           if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else "")
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
