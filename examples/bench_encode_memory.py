"""Benchmark (not a test): the peak memory of ``cmhash encode`` must not grow with the number
of items. Encodes --small and --large text items (a file list, one short text per line) with
a tiny bundle (a linear + tanh text tower made with ``onnx.helper``), each in a fresh
process, and prints the peak resident memory (VmHWM) of each and their difference.

Nothing is held per item: the input is streamed (a file list a line at a time), model input
is held per batch, records, codes and names per chunk, and the output files are written a
part at a time. What is left is the allocator settling, a few bytes per item at most.

    python examples/bench_encode_memory.py [--small 10000] [--large 100000]

Needs onnx (the export extra) and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cmhash.cli import exit_without_extra

WORDS = ["beach", "cat", "dog", "night", "sea", "sky", "snow", "sofa", "street", "sunset", "tree", "water"]
BITS = 64

CHILD = """
import json, sys
from cmhash.offline import encode_collection
summary = encode_collection(sys.argv[1], sys.argv[2], sys.argv[3], modality="text", batch_size=256, workers=2,
                            threads=1)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"encoded": summary["encoded"], "peak_kib": peak, "seconds": summary["seconds"]}))
"""


def make_bundle(directory: Path) -> None:
    from onnx import TensorProto, checker, helper, numpy_helper

    from cmhash.bundle import text_modality, write_bundle
    from cmhash.text import Vocabulary

    vocabulary = Vocabulary.from_words(WORDS)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((BITS, vocabulary.dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["bow", "w", "b"], ["g"], transB=1), helper.make_node("Tanh", ["g"], ["codes"])],
        "text_hash",
        [helper.make_tensor_value_info("bow", TensorProto.FLOAT, ["batch", vocabulary.dim])],
        [helper.make_tensor_value_info("codes", TensorProto.FLOAT, ["batch", BITS])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.zeros(BITS, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    manifest = {"method": "tiny", "bits": BITS, "label_names": ["a"],
                "modalities": {"text": text_modality("text.onnx", vocabulary.dim, vocabulary=vocabulary)}}
    write_bundle(directory, manifest, {"text.onnx": model.SerializeToString(), "vocab.json": vocabulary.to_json().encode()})


def peak_of(bundle: Path, items: int, folder: Path) -> dict:
    rng = np.random.default_rng(items)
    source = folder / f"texts-{items}.txt"
    words = np.asarray(WORDS)
    source.write_text("".join(" ".join(words[rng.integers(0, len(WORDS), 3)]) + "\n" for _ in range(items)))
    out = folder / f"out-{items}"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(source), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    args = parser.parse_args()
    exit_without_extra("export", "onnx")
    with tempfile.TemporaryDirectory(prefix="cmhash-bench-memory-") as tmp:
        tmp = Path(tmp)
        make_bundle(tmp / "bundle")
        small, large = peak_of(tmp / "bundle", args.small, tmp), peak_of(tmp / "bundle", args.large, tmp)
    growth = (large["peak_kib"] - small["peak_kib"]) * 1024 / (args.large - args.small)
    print(json.dumps({"small": {"items": args.small, **small}, "large": {"items": args.large, **large},
                      "load_average": round(os.getloadavg()[0], 1)}, indent=1))
    print(f"peak RSS: {small['peak_kib'] / 1024:.1f} MiB at {args.small:,} items, {large['peak_kib'] / 1024:.1f} MiB at "
          f"{args.large:,}: {growth:.0f} bytes per extra item")


if __name__ == "__main__":
    main()
