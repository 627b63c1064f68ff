"""The phases of ``export_checkpoint`` one at a time, on the tiny torch towers of the
fixtures (no checkpoint, no training): towers -> variants -> reference sets ->
verification -> what is kept."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cmhash.errors import BackendUnavailableError  # noqa: E402
from cmhash.export.api import (  # noqa: E402
    export_towers,
    keep_passing,
    make_variants,
    reference_sets,
    verification_backends,
    verify_variants,
)
from cmhash.export.verify import RealInputs, torch_outputs  # noqa: E402
from cmhash.backends import ModelSpec  # noqa: E402
from cmhash.reference import Contract  # noqa: E402
from fixtures.towers import random_weights, torch_towers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BITS, DIM, SIZE = 16, 12, 32


@pytest.fixture(scope="module")
def phases():
    image, text = torch_towers(random_weights(BITS, DIM, seed=4))
    rng = np.random.default_rng(0)
    inputs = RealInputs(source="generated", pixels=rng.standard_normal((48, 3, SIZE, SIZE)).astype(np.float32),
                        bow=(rng.random((48, DIM)) < 0.3).astype(np.float32), paired=True)
    towers = {"image": image, "text": text}
    fp32 = export_towers(towers, inputs, BITS)
    models, notes = make_variants(fp32, fp16=True, int8=True, int8_dynamic=True, calibration=inputs, fallback=inputs,
                                  calibration_items=32)
    return towers, inputs, models, notes


def test_towers_then_variants(phases):
    _, _, models, notes = phases
    assert {m: list(v) for m, v in models.items()} == {m: ["fp32", "fp16", "int8", "int8-dynamic"]
                                                        for m in ("image", "text")}
    assert notes["int8_image"]["weights"].startswith("7-bit") and notes["int8-dynamic_text"]["weights"].startswith("7-bit")


def int8_weights(model_bytes: bytes) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    return [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]


def test_int8_weights_fit_in_7_bits(phases):
    """No u8 x s8 pair sum can saturate a 16-bit lane on CPUs without VNNI. (Only the image
    tower's convolution is quantised here: the hash heads stay float; the int8-dynamic
    attention tower is checked in test_export_attention.py.)"""
    _, _, models, _ = phases
    weights = int8_weights(models["image"]["int8"])
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 64


def test_reference_sets_store_small_exact_inputs_and_pytorch_outputs_for_them(phases):
    towers, inputs, _, _ = phases
    sets = reference_sets(towers, inputs, 8)
    images, image_out = sets["image"]
    bow, text_out = sets["text"]
    assert images.dtype == np.float16 and images.shape == (8, 3, SIZE, SIZE)
    assert bow.dtype == np.uint8 and np.array_equal(bow, inputs.bow[:8])
    assert np.array_equal(image_out, torch_outputs(towers["image"], images.astype(np.float32)))  # on the stored values
    with pytest.raises(ValueError, match="reference_items"):
        reference_sets(towers, inputs, 0)


def test_verification_judges_every_variant_on_inputs_and_reference_set(phases):
    towers, inputs, models, _ = phases
    specs = {"image": ModelSpec("image", "pixel_values", ("batch", 3, SIZE, SIZE), "codes", BITS),
             "text": ModelSpec("text", "bow", ("batch", DIM), "codes", BITS)}
    pytorch = {m: torch_outputs(t, inputs.of(m)) for m, t in towers.items()}
    references = reference_sets(towers, inputs, 8)
    results, outputs = verify_variants(models, specs, inputs, pytorch, references, verification_backends(False, None),
                                       Contract())
    assert len(results) == 8 and all(r["passed"] for r in results) and keep_passing(results) == {}
    assert {r["reference"]["items"] for r in results} == {8} and len(outputs) == 8
    fp32 = [r for r in results if r["variant"] == "fp32"]
    assert all(r["max_abs_delta"] <= 1e-4 for r in fp32)

    strict = Contract(bit_floor=1.0, fp32_tolerance=0.0)  # nothing lossy meets it
    results, _ = verify_variants(models, specs, inputs, pytorch, references, verification_backends(False, None), strict)
    assert "fp32" in keep_passing(results)


def test_tensorrt_verification_is_refused_before_any_work_without_it():
    from cmhash.backends import REGISTRY

    if REGISTRY["tensorrt"].available("cuda")[0]:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendUnavailableError, match="--tensorrt needs TensorRT and a GPU"):
        verification_backends(True, None)
