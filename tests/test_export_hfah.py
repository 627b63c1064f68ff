"""HFAH round trip: train the shipped demo config (small sizes) for one epoch on a small
generated shapes set, export the image and text towers alone (no label network, decoders,
discriminators or banks), then hash the rendered images and captions through ``Encoder``
and compare with the PyTorch towers fed by the training pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cmhash.encoder import Encoder  # noqa: E402
from cmhash.training.data import captions  # noqa: E402
from fixtures.roundtrip import bit_agreement, round_trip, train_and_export  # noqa: E402

run = pytest.importorskip("cmhash.training.run")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hfah(tmp_path_factory):
    return train_and_export(tmp_path_factory, "hfah", ["model.hidden=64", "model.feature_dim=32",
                                                      "model.label_pretrain_epochs=2"], fp16=True)


def test_hfah_exports_only_the_towers_and_verifies(hfah):
    _, _, bundle, report = hfah
    assert report["method"] == "hfah" and report["passed"]
    for r in report["results"]:
        assert r["bit_agreement"] >= (0.999 if r["variant"] == "fp32" else 0.97)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["bits"] == 16
    import onnx

    for path in bundle.glob("*.onnx"):  # no training-only weights went into the graphs
        names = {init.name for init in onnx.load(str(path)).graph.initializer}
        assert not any(part in name for name in names for part in ("label_net", "recon", "disc", "banks"))


def test_hfah_encoder_codes_equal_pytorch(hfah):
    config, out, bundle, _ = hfah
    _, method, _ = run.load_trained(out)
    prepared = run.prepare_data(config, vocabulary=None)
    data, split = prepared.data, prepared.split
    items = np.concatenate([split.query, split.database[:100]])
    enc = Encoder.load(bundle, threads=1)
    trip = round_trip(method, prepared, items, enc)  # rendered PIL images, as a user would pass them
    assert bit_agreement(trip.image_codes, trip.ref_image) >= 0.999
    assert bit_agreement(trip.text_codes, trip.ref_text) >= 0.999
    texts = [captions(data)[int(i)] for i in items]
    assert np.array_equal(enc.hash_texts(texts), trip.text_codes)  # raw captions, tokenised by the bundle
