"""EGATH round trip: train the shipped demo config for one epoch on a small generated shapes
set, export with fp16, int8 and int8-dynamic (verified and calibrated on the run's own data, rebuilt from
the checkpoint), then hash the rendered images and captions through ``Encoder`` and compare
with the PyTorch towers fed by the training pipeline."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("open_clip")

from cmhash import pack_codes  # noqa: E402
from cmhash.encoder import Encoder  # noqa: E402
from cmhash.metrics import mean_average_precision  # noqa: E402
from cmhash.training.data import captions  # noqa: E402
from fixtures.roundtrip import bit_agreement, round_trip, train_and_export  # noqa: E402

run = pytest.importorskip("cmhash.training.run")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def egath(tmp_path_factory):
    return train_and_export(tmp_path_factory, "egath", fp16=True, int8=True, int8_dynamic=True)


def test_egath_exports_and_verifies_on_its_training_data(egath):
    _, _, bundle, report = egath
    assert report["method"] == "egath" and report["passed"]
    assert report["inputs"]["source"].startswith("training data of")
    assert len(report["results"]) == 8
    for r in report["results"]:
        assert r["bit_agreement"] >= (0.999 if r["variant"] == "fp32" else 0.97)
    assert abs(report["map"]["fp32"]["delta_i2t"]) <= 0.005 and abs(report["map"]["fp32"]["delta_t2i"]) <= 0.005


def test_egath_encoder_codes_and_map_equal_pytorch(egath):
    config, out, bundle, _ = egath
    _, method, _ = run.load_trained(out)
    prepared = run.prepare_data(config, vocabulary=None)
    data, split = prepared.data, prepared.split
    items = np.concatenate([split.query, split.database[:150]])
    enc = Encoder.load(bundle, threads=1)
    trip = round_trip(method, prepared, items, enc)  # rendered PIL images, as a user would pass them
    ref_image, ref_text, image_codes, text_codes = trip.ref_image, trip.ref_text, trip.image_codes, trip.text_codes
    assert bit_agreement(image_codes, ref_image) >= 0.999 and bit_agreement(text_codes, ref_text) >= 0.999
    texts = [captions(data)[int(i)] for i in items]
    assert np.array_equal(enc.hash_texts(texts), text_codes)  # raw captions, tokenised by the bundle

    labels = data.labels[items]
    q, db = slice(0, 50), slice(50, None)
    ti, tt = pack_codes(ref_image, input="sign"), pack_codes(ref_text, input="sign")
    assert abs(mean_average_precision(image_codes[q], text_codes[db], labels[q], labels[db])
               - mean_average_precision(ti[q], tt[db], labels[q], labels[db])) <= 0.005
    assert abs(mean_average_precision(text_codes[q], image_codes[db], labels[q], labels[db])
               - mean_average_precision(tt[q], ti[db], labels[q], labels[db])) <= 0.005

    for variant in ("fp16", "int8", "int8-dynamic"):
        reduced = Encoder.load(bundle, threads=1, variant=variant).hash_images(trip.images)
        agree = np.unpackbits(reduced, axis=1, bitorder="little") == np.unpackbits(image_codes, axis=1, bitorder="little")
        assert agree.mean() >= 0.97
