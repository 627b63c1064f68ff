"""``cmhash demo``: the whole product in one run. Train a small EGATH on generated shapes
(training), score and search with it, then export it to a bundle and hash raw captions and
images through the runtime alone (export, runtime). It lives here, in the top layer,
because it uses every layer below; without the export extra it stops after training.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cmhash import Encoder, HashIndex
from cmhash.metrics import mean_average_precision
from cmhash.training.data import captions
from cmhash.training.run import Prepared, encode_both, load_config, prepare_data
from cmhash.training.trainer import Trainer, build_method

log = logging.getLogger("cmhash.demo")
DEMO_CONFIG = "egath/demo"


def demo(out_dir: str | Path | None = None, progress: bool = True, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``cmhash demo``: train the shipped EGATH demo config on the generated shapes, then
    score and search with the trained towers. Returns mAPs, random-code mAP and an example."""
    with tempfile.TemporaryDirectory(prefix="cmhash-demo-") as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        config = load_config(DEMO_CONFIG, [f"train.out_dir={out}", f"train.progress={progress}", *overrides])
        started = time.perf_counter()
        log.info("demo: generating %s images of coloured shapes with captions", config.data.get("n", "the"))
        prepared = prepare_data(config)
        log.info("demo: data ready in %.0f s; training EGATH for %d epochs", time.perf_counter() - started,
                 config.train.epochs)
        method = build_method(config, prepared.info)
        started = time.perf_counter()
        result = Trainer(config, method, prepared.train, prepared.query, prepared.database).fit()
        train_seconds = time.perf_counter() - started
        # the trainer's evaluation after the last epoch: the towers' query-vs-database mAPs
        i2t, t2i = result.last["map_i2t"], result.last["map_t2i"]
        split, texts = prepared.split, captions(prepared.data)
        q_lab, d_lab = prepared.data.labels[split.query], prepared.data.labels[split.database]
        rng = np.random.default_rng(0)
        width = config.model.bits // 8
        random_map = mean_average_precision(rng.integers(0, 256, (len(q_lab), width), dtype=np.uint8),
                                            rng.integers(0, 256, (len(d_lab), width), dtype=np.uint8), q_lab, d_lab)
        if _export_available():  # search as an application would: the SDK's codes of raw inputs
            log.info("demo: exporting the bundle, then hashing the captions and images again with cmhash.Encoder")
            deployed = _demo_deployed(out, prepared, texts)
            d_img, q_txt = deployed.pop("database_image_codes"), deployed.pop("query_text_codes")
        else:
            deployed = None
            for module in method.modules().values():
                module.eval()
            _, q_txt, _, d_img, _, _ = encode_both(method, prepared.query, prepared.database, 500)

    index = HashIndex(config.model.bits)
    index.add(d_img)
    distances, ids = index.search(q_txt[:1], 5)
    example = {"query": texts[int(split.query[0])],
               "captions": [texts[int(split.database[i])] for i in ids[0]],
               "distances": [int(d) for d in distances[0]]}
    return {"method": config.method, "bits": config.model.bits, "epochs": config.train.epochs,
            "n_train": len(prepared.train), "n_query": len(q_lab), "n_database": len(d_lab),
            "i2t": round(float(i2t), 4), "t2i": round(float(t2i), 4), "random": round(float(random_map), 4),
            "train_seconds": round(train_seconds, 1), "example": example, "deployed": deployed,
            "checkpoint": str(out / "best") if out_dir is not None else None,
            "bundle": str(out / "bundle") if out_dir is not None and deployed is not None else None}


def _export_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _demo_deployed(out: Path, prepared: Prepared, texts: list[str]) -> dict[str, Any]:
    """Export the best checkpoint to a bundle, then hash the raw query captions and the
    database images with the SDK's Encoder (numpy + onnxruntime, no torch) and score them."""
    from .api import export_checkpoint  # needs onnx, which the train extra alone lacks

    report = export_checkpoint(out / "best", out / "bundle", overwrite=True)
    encoder = Encoder.load(out / "bundle")
    data, split = prepared.data, prepared.split
    query_texts = encoder.hash_texts([texts[i] for i in split.query])
    query_images = encoder.hash_images(data.images.load(int(i)) for i in split.query)
    database_images = encoder.hash_images(data.images.load(int(i)) for i in split.database)
    database_texts = encoder.hash_texts([texts[i] for i in split.database])
    q_lab, d_lab = data.labels[split.query], data.labels[split.database]
    return {"i2t": round(float(mean_average_precision(query_images, database_texts, q_lab, d_lab)), 4),
            "t2i": round(float(mean_average_precision(query_texts, database_images, q_lab, d_lab)), 4),
            "bits_equal_to_pytorch": {r["modality"]: round(float(r["bit_agreement"]), 6) for r in report["results"]},
            "database_image_codes": database_images, "query_text_codes": query_texts}
