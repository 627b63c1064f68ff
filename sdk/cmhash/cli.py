"""The ``cmhash`` command line: one entry point, a subcommand per library call.

``main(argv)`` takes its arguments as a list, so tests call it directly.

Where commands come from. The runtime's own commands (encode, index, search, query, serve, bench) are
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
from pathlib import Path
from typing import Callable

from . import __version__
from .backends import BACKENDS
from .bundle import VARIANTS
from .cpus import quiet_openmp_waits
from .errors import CmhashError
from .inputs import IMAGE_SUFFIXES

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


def cmd_index(args) -> int:
    from .index import HashIndex, MultiIndex, load_index

    if args.index_cmd in ("build", "export") and Path(args.out).exists() and not args.force:
        raise CmhashError(f"{args.out} already exists; pass --force to replace it, or choose another --out")
    if args.index_cmd == "build":
        if args.kind == "mih":
            index = MultiIndex.from_codes_file(args.codes, substrings=args.substrings)
        elif args.substrings is not None:
            raise CmhashError("--substrings applies to --kind mih only")
        else:
            index = HashIndex.from_codes_file(args.codes)
        index.save(args.out)
        info = {"path": args.out}
    elif args.index_cmd == "export":
        from .faiss_interop import write_faiss

        require_extra("faiss", "faiss", needed_by="cmhash index export --format faiss")
        index = load_index(args.index, mmap=True)
        write_faiss(index, args.out)
        info = {"path": args.out, "count": len(index), "bits": index.bits, "format": args.format}
    else:
        from .query import open_index

        index = open_index(args.index)
        info = {"path": args.index}
    if args.index_cmd != "export":
        if hasattr(index, "shards"):  # a ShardedIndex
            info.update(count=len(index), bits=index.bits, kind="sharded", shards=len(index.shards))
        else:
            info.update(count=len(index), bits=index.bits, kind=index.kind, names=index.has_names,
                        metadata=index.metadata)
    if args.json:
        print_json(info)
    elif args.index_cmd == "export":
        print(f"{info['path']}: {info['count']} codes of {info['bits']} bits as a FAISS IndexBinaryIDMap2")
    else:
        print(f"{info['path']}: {info['count']} codes of {info['bits']} bits, {info['kind']} index"
              + (f" of {info['shards']} shards" if "shards" in info else "")
              + (", with item names" if info.get("names") else ""))
        for key, value in sorted(info.get("metadata", {}).items()):
            print(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")
    return 0


def cmd_search(args) -> int:
    from .codefiles import load_codes
    from .query import open_index

    queries_path = Path(args.queries)
    if queries_path.is_dir() or queries_path.suffix.lower() in IMAGE_SUFFIXES:
        raise CmhashError(f"{args.queries} is {'a folder' if queries_path.is_dir() else 'an image'}, not a file of "
                          "packed codes; to search with a text or an image, run: cmhash query BUNDLE INDEX "
                          "--text '...' or --image PATH")
    index = open_index(args.index)
    queries = load_codes(args.queries).codes
    t0 = time.perf_counter()
    dist, ids = index.search(queries, args.k)
    seconds = time.perf_counter() - t0
    report = None
    if args.explain:
        report = index.explain(queries, k=args.k) if hasattr(index, "explain") else {
            "path": "scan", "reason": f"a {index.kind} index always scans"}
    if args.json:
        print_json({"distances": dist.tolist(), "ids": ids.tolist(), "seconds": seconds,
                    **({"explain": report} if report is not None else {})})
        return 0
    for qi in range(len(ids)):
        found = [int(i) for i in ids[qi] if i >= 0]
        shown = index.names(found) if found else []
        print(f"query {qi}: " + ", ".join(f"{i} {n} ({d})" if n else f"{i} ({d})"
                                          for i, n, d in zip(found, shown, dist[qi])))
    print(f"{len(ids)} queries, k={args.k}, {seconds * 1e3:.2f} ms", file=sys.stderr)
    if report is not None:
        print(f"path: {report['path']} ({report['reason']})", file=sys.stderr)
    return 0


def _index_argument(path: str) -> None:
    """A bundle given where an index goes (the two swapped) is named as such."""
    if Path(path).is_dir() and (Path(path) / "manifest.json").is_file():
        raise CmhashError(f"{path} is a bundle, not an index; the arguments are BUNDLE INDEX")


def cmd_query(args) -> int:
    from .query import Searcher

    _index_argument(args.index)
    if args.radius is not None and args.radius < 0:
        raise CmhashError(f"--radius must be at least 0, got {args.radius}")
    searcher = Searcher.open(args.bundle, args.index, threads=args.threads)
    started = time.perf_counter()
    if args.image is not None:
        hits = searcher.search_image(Path(args.image), args.k, args.radius)  # a path, never read as a text
        query = {"image": args.image}
    else:
        hits = searcher.search_text(args.text, args.k, args.radius)
        query = {"text": args.text}
    seconds = time.perf_counter() - started
    if args.json:
        print_json({"query": query, "bundle": args.bundle, "index": args.index, "k": args.k, "radius": args.radius,
                    "results": [hit.to_dict() for hit in hits], "seconds": round(seconds, 6)})
        return 0
    print(f"{'rank':>4}  {'distance':>8}  {'id':>8}  name")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.distance:>8}  {hit.id:>8}  {hit.name if hit.name is not None else '-'}")
    print(f"{len(hits)} results of {len(searcher):,} items in {seconds * 1e3:.1f} ms", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    require_extra("serve", "starlette", "uvicorn", "python_multipart")
    from .encoder import Encoder
    from .query import Searcher
    from .server import create_app, serve

    for path in args.index:
        _index_argument(path)
    names = [Path(p).stem for p in args.index]
    if len(set(names)) != len(names):
        raise CmhashError(f"two indexes share a name ({', '.join(names)}); the page names each collection by its "
                          "file name, so rename one")
    encoder = Encoder.load(args.bundle, threads=args.threads)
    collections = {name: Searcher.open(encoder, path) for name, path in zip(names, args.index)}
    app = create_app(collections, images=args.images)
    serve(app, host=args.host, port=args.port)
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
    from .offline import Progress

    progress = None if args.json or args.quiet else Progress()
    if args.engine == "ray":
        require_extra("ray", "ray", "pyarrow", "fsspec", needed_by="--engine ray")
        from .offline import parse_shard
        from .scale.ray_encode import encode_with_ray

        if parse_shard(args.shard) != (0, 1):
            raise CmhashError("--shard splits a job by hand; with --engine ray the cluster splits it (leave --shard out)")
        summary = encode_with_ray(
            args.bundle, args.input, args.out, modality=args.modality, column=args.column, address=args.address,
            actors=args.actors, cpus_per_actor=args.threads or 1, gpus_per_actor=0 if args.device == "cpu" else 1,
            chunk_size=args.chunk_size, batch_size=args.batch_size, variant=args.variant, backend=args.backend,
            resume=args.resume, progress=progress)
        where = f"Parquet parts in {summary['codes']}; {summary['errors']} unreadable (listed in {summary['errors_dir']})"
    else:
        from .offline import encode_collection

        if args.address or args.actors or args.column:
            raise CmhashError("--address, --actors and --column go with --engine ray")
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
            progress=progress,
            output_format=args.format,
        )
        where = f"{summary['codes']}; {summary['errors']} unreadable (listed in {summary['errors_file']})"
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['encoded']} of {summary['items']} items encoded into {where}; "
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
    build = isub.add_parser("build", help="index packed codes from .npy / .npz / Parquet (codes [, ids, names])")
    build.add_argument("codes", help=".npy of packed uint8 codes, .npz with 'codes' (and 'ids', 'names', "
                       "'bundle_fingerprint') or Parquet codes (a file or a folder of parts), as cmhash encode writes")
    build.add_argument("--out", required=True, help="the index file to write")
    build.add_argument("--force", action="store_true", help="replace --out if it exists")
    build.add_argument("--kind", choices=["flat", "mih"], default="flat",
                       help="flat: a scan of every code; mih: multi-index hashing tables (default flat)")
    build.add_argument("--substrings", type=positive_int, default=None,
                       help="--kind mih: number of tables (default: bits / log2(n))")
    build.add_argument("--json", action="store_true", help="print one JSON object")
    info = isub.add_parser("info", help="count, bit length, kind and metadata of an index file or sharded index")
    info.add_argument("index", help="an index file, a folder of shards or a JSON shard list")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    export = isub.add_parser("export", help="write an index file for another library (FAISS)")
    export.add_argument("index", help="an index file written by cmhash index build or HashIndex.save")
    export.add_argument("--format", required=True, choices=["faiss"],
                        help="faiss: an IndexBinaryIDMap2 file faiss.read_index_binary opens, with the same ids")
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="k nearest codes of each query in an index")
    search.add_argument("index", help="an index file, a folder of shards (*.cmhidx, *.parquet), a JSON shard list "
                                      "or Parquet codes")
    search.add_argument("queries", help=".npy of packed uint8 codes, .npz with 'codes' or Parquet codes")
    search.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default 10)")
    search.add_argument("--json", action="store_true", help="print distances, ids and seconds as JSON")
    search.add_argument("--explain", action="store_true",
                        help="also say how the search was answered (tables or scan, and why)")
    search.set_defaults(func=cmd_search)

    query = sub.add_parser("query", help="search a collection with a text or an image: rank, distance, id and name")
    query.add_argument("bundle", help="the bundle that encoded the collection (folder or archive)")
    query.add_argument("index", help="an index built by cmhash index build from the codes.npz of cmhash encode")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query, in words of the bundle's vocabulary")
    what.add_argument("--image", help="the path of a query image (it must exist)")
    query.add_argument("-k", "--k", type=positive_int, default=10, help="results (default 10)")
    query.add_argument("--radius", type=int, help="only results within this Hamming distance (still at most k)")
    query.add_argument("--threads", type=positive_int, help="onnxruntime threads")
    query.add_argument("--json", action="store_true", help="print the query and its results as JSON")
    query.set_defaults(func=cmd_query)

    serve = sub.add_parser("serve", help="a search page and JSON API over a bundle and its indexes (serve extra)")
    serve.add_argument("bundle", help="the bundle that encoded the collections (folder or archive)")
    serve.add_argument("index", nargs="+", help="one or more indexes, each a collection named by its file name")
    serve.add_argument("--images", help="the folder the image collection was encoded from: thumbnails come from it")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--threads", type=positive_int, help="onnxruntime threads")
    serve.set_defaults(func=cmd_serve)

    encode = sub.add_parser("encode", help="hash a folder, file list or manifest into codes + ids (resumable)")
    encode.add_argument("bundle", help="a bundle folder or archive written by cmhash export")
    encode.add_argument("input", help="folder, file list (one path or text per line) or manifest (.jsonl/.csv); "
                        "with --engine ray also Parquet or a URL (s3://...)")
    encode.add_argument("--out", required=True, help="output folder (codes.npz, errors.jsonl, summary.json; "
                        "with --engine ray: codes/ and errors/ Parquet parts, a path or a URL)")
    encode.add_argument("--format", default="npz", choices=["npz", "parquet"],
                        help="npz (default): codes.npz + errors.jsonl; parquet: codes.parquet + errors.parquet "
                        "(--engine ray always writes Parquet parts)")
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
    encode.add_argument("--threads", type=positive_int,
                        help="onnxruntime threads (with --engine ray: CPUs per actor, default 1)")
    encode.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this process (default); ray: a Ray cluster, Parquet parts out (the ray extra)")
    encode.add_argument("--address", help="with --engine ray: the cluster (ray://host:10001, auto); default a local one")
    encode.add_argument("--actors", type=positive_int, help="with --engine ray: encoder actors (default: as CPUs allow)")
    encode.add_argument("--column", help="with --engine ray and Parquet input: the column of image bytes, paths or texts")
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
