"""Latency of ``cmhash serve``'s JSON API on the demo collection: p50 and p99 of text
queries over HTTP, against the same searches made in process (no HTTP) as the baseline.

    cmhash demo --out runs/demo                       # trains and exports the demo bundle (minutes)
    python examples/bench_serve.py runs/demo/bundle   # [--n 3000] [--queries 300] [--work DIR]

It writes the demo's generated shapes (the images and captions ``cmhash demo`` trains and
evaluates on: ``make_shapes(3000, seed=0)``) as PNG files and a caption manifest, encodes
both with the bundle (``cmhash encode``), builds an index of each (``cmhash index build``),
starts ``cmhash serve`` on a free loopback port in a subprocess, and times
``GET /api/search?text=<caption>`` over one kept-alive connection, and ``POST`` image
uploads, one request at a time. The baseline is :meth:`cmhash.query.Searcher.search_text`
in this process on the same bundle and index: the ratio is what HTTP and JSON add. Prints
one JSON object.

Needs the train extra (for the generated shapes) and the serve extra:
``pip install "cmhash-sdk[train,serve]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

from cmhash.cli import exit_without_extra, main as cmhash_main


def write_demo_collection(folder: Path, n: int) -> tuple[Path, Path, list[str]]:
    """The demo's shapes as ``images/shape-NNNNN.png`` and ``captions.jsonl`` (each caption's
    name is the caption itself, so that results read as text)."""
    from cmhash.training.data.shapes import captions, make_shapes

    data = make_shapes(n, seed=0, image_size=64)
    texts = captions(data)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = images / f"shape-{i:05d}.png"
        if not path.exists():
            data.images.load(i).save(path)
    manifest = folder / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"{i:05d}: {t}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return images, manifest, texts


def build(bundle: str, source: Path, out: Path, modality: str) -> Path:
    index = out.with_suffix(".cmhidx")
    if not index.exists():
        for argv in (["encode", bundle, str(source), "--out", str(out), "--modality", modality, "--quiet"],
                     ["index", "build", str(out / "codes.npz"), "--out", str(index)]):
            with contextlib.redirect_stdout(sys.stderr):  # stdout is for the one JSON record
                status = cmhash_main(argv)
            if status != 0:
                raise SystemExit(f"cmhash {' '.join(argv)} failed")
    return index


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2), "n": len(ms)}


def start_server(bundle: str, indexes: list[Path], images: Path, threads: int) -> tuple[subprocess.Popen, str, int]:
    argv = [sys.executable, "-m", "cmhash.cli", "serve", bundle, *map(str, indexes), "--images", str(images),
            "--port", "0", "--threads", str(threads)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()  # "cmhash serve: http://127.0.0.1:PORT/ ..."
    if "http://" not in line:
        server.kill()
        raise SystemExit(f"cmhash serve did not start: {line!r}")
    address = urllib.parse.urlsplit(line.split()[2])
    return server, address.hostname, address.port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="the demo bundle (cmhash demo --out DIR writes DIR/bundle)")
    parser.add_argument("--n", type=int, default=3000, help="items of the demo collection (default 3000, the demo's)")
    parser.add_argument("--queries", type=int, default=300, help="timed text queries (default 300)")
    parser.add_argument("--images", type=int, default=50, help="timed image uploads (default 50)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads, server and baseline (default 1)")
    parser.add_argument("--work", help="keep the collection, codes and indexes here (default: a temporary folder)")
    args = parser.parse_args()
    exit_without_extra("train", "torch")
    exit_without_extra("serve", "starlette", "uvicorn", "python_multipart")
    if not Path(args.bundle).exists():
        parser.error(f"no bundle at {args.bundle}; make one with: cmhash demo --out runs/demo")

    with tempfile.TemporaryDirectory(prefix="cmhash-bench-serve-") as tmp:
        work = Path(args.work or tmp)
        images, manifest, texts = write_demo_collection(work, args.n)
        photo_index = build(args.bundle, images, work / "photos", "image")
        caption_index = build(args.bundle, manifest, work / "captions", "text")
        rng = np.random.default_rng(0)
        queries = [texts[i] for i in rng.integers(0, len(texts), args.queries)]
        uploads = [(images / f"shape-{i:05d}.png").read_bytes() for i in rng.integers(0, args.n, args.images)]

        from cmhash.query import Searcher

        searcher = Searcher.open(args.bundle, photo_index, threads=args.threads)
        for q in queries[:10]:  # warm-up
            searcher.search_text(q, args.k)
        local = []
        for q in queries:
            t0 = time.perf_counter()
            searcher.search_text(q, args.k)
            local.append(time.perf_counter() - t0)

        server, host, port = start_server(args.bundle, [photo_index, caption_index], images, args.threads)
        try:
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as a browser does: no Nagle delay

            def get(text: str) -> dict:
                conn.request("GET", "/api/search?" + urllib.parse.urlencode({"text": text, "k": args.k}))
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise SystemExit(f"GET /api/search: {response.status} {body[:200]!r}")
                return json.loads(body)

            def post(data: bytes) -> dict:
                boundary = "cmhash-bench"
                form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
                        f"Content-Type: image/png\r\n\r\n").encode() + data + (
                    f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"collection\"\r\n\r\ncaptions"
                    f"\r\n--{boundary}--\r\n").encode()
                conn.request("POST", "/api/search", body=form,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise SystemExit(f"POST /api/search: {response.status} {body[:200]!r}")
                return json.loads(body)

            for q in queries[:10]:
                get(q)
            over_http, image_http = [], []
            for q in queries:
                t0 = time.perf_counter()
                get(q)
                over_http.append(time.perf_counter() - t0)
            for data in uploads:
                t0 = time.perf_counter()
                post(data)
                image_http.append(time.perf_counter() - t0)
            conn.close()
        finally:
            server.terminate()
            server.wait(10)

    text_api, baseline = percentiles(over_http), percentiles(local)
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "collection": f"{args.n} generated shapes (cmhash demo's), {searcher.encoder.bits}-bit codes",
        "k": args.k, "threads": args.threads,
        "text_query_api": text_api,
        "text_query_in_process": baseline,
        "api_over_in_process_p50": round(text_api["p50_ms"] / baseline["p50_ms"], 2),
        "image_upload_api": percentiles(image_http),
    }, indent=2))


if __name__ == "__main__":
    main()
