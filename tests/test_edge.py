"""Edge deployment with the real onnxruntime: execution providers (selection, typed errors,
fallback, what runs), ``Encoder.info``, and ORT-format towers (``cmhash export --ort``:
converted, verified, listed in the manifest, loaded, checked by ``cmhash verify``)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx", reason="the tests build their ONNX towers with the onnx package")

import cmhash  # noqa: E402
from cmhash.bundle import load_bundle  # noqa: E402
from cmhash.cli import main  # noqa: E402
from cmhash.encoder import Encoder  # noqa: E402
from cmhash.errors import BundleError, InvalidArgumentError, ProviderUnavailableError  # noqa: E402
from fixtures.towers import make_bundle  # noqa: E402

MISSING = next(name for name in ("OpenVINOExecutionProvider", "QNNExecutionProvider", "CoreMLExecutionProvider")
               if name not in ort.get_available_providers())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", bits=32, image_size=32)[0]


def images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 40, 48, 3), dtype=np.uint8)


# --- providers ------------------------------------------------------------------------------------------


def test_available_providers_is_what_onnxruntime_offers(capsys):
    assert cmhash.available_providers() == ort.get_available_providers()
    assert main(["providers", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["available"] == ort.get_available_providers()
    rows = {r["provider"]: r for r in listed["providers"]}
    assert rows["CPUExecutionProvider"]["available"] and not rows[MISSING]["available"]
    assert "onnxruntime-openvino" in rows["OpenVINOExecutionProvider"]["package"] or rows["OpenVINOExecutionProvider"]["available"]


def test_cpu_by_either_name_runs_and_info_says_what_runs(bundle):
    reference = Encoder.load(bundle).hash_images(images())
    for providers in (["cpu"], ["CPUExecutionProvider"], [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]):
        with Encoder.load(bundle, providers=providers, threads=1) as enc:
            assert np.array_equal(enc.hash_images(images()), reference)
            info = enc.info()
            assert (info["backend"], info["provider"], info["providers"]) == ("onnxruntime", "CPUExecutionProvider",
                                                                             ["CPUExecutionProvider"])
            assert (info["variant"], info["model_format"], info["threads"]) == ("fp32", "onnx", 1)
            assert info["fingerprint"] == enc.fingerprint == load_bundle(bundle).fingerprint
            assert info["models"]["image"] == {"file": "image.onnx", "bytes": (bundle / "image.onnx").stat().st_size}
            assert "pretrained" not in info  # the bundle records no pretrained weights


def test_a_missing_provider_is_a_typed_error_naming_its_package(bundle):
    with pytest.raises(ProviderUnavailableError, match="allow_fallback") as caught:
        Encoder.load(bundle, providers=[MISSING, "cpu"])
    assert caught.value.provider == MISSING and MISSING in str(caught.value)
    assert isinstance(caught.value, cmhash.BackendUnavailableError)
    with pytest.raises(ProviderUnavailableError, match="onnxruntime-openvino"):
        Encoder.load(bundle, providers=["openvino"]) if "OpenVINOExecutionProvider" not in ort.get_available_providers() \
            else pytest.skip("OpenVINO is installed here")
    with pytest.raises(InvalidArgumentError, match="unknown execution provider 'warp-drive'"):
        Encoder.load(bundle, providers=["warp-drive"])
    with pytest.raises(InvalidArgumentError, match="backend='onnxruntime'"):
        Encoder.load(bundle, backend="tensorrt", device="cuda", providers=["cpu"])
    with pytest.raises(InvalidArgumentError, match="not both"):
        Encoder.load(bundle, device="cuda", providers=["cpu"])


def test_fallback_warns_once_and_runs_on_the_cpu(bundle):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        enc = Encoder.load(bundle, providers=[(MISSING, {"device_type": "GPU"}), "cpu"], allow_fallback=True)
    messages = [str(w.message) for w in said if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and MISSING in messages[0] and "falling back" in messages[0]
    assert enc.providers == ["CPUExecutionProvider"] and enc.info()["provider"] == "CPUExecutionProvider"
    assert np.array_equal(enc.hash_images(images()), Encoder.load(bundle).hash_images(images()))


def test_info_shows_the_pretrained_weights_the_manifest_records(tmp_path):
    pretrained = {"tag": "openai", "file": "ViT-B-32.safetensors", "sha256": "ab" * 32}
    path, _ = make_bundle(tmp_path / "b", bits=16, image_size=16)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["provenance"]["pretrained"] = pretrained
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert Encoder.load(path).info()["pretrained"] == pretrained


# --- ORT format ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory):
    """The phases of cmhash export on the fixtures' torch towers, with --ort: fp32 and
    int8-dynamic in ONNX and ORT format, verified, and written as a bundle."""
    pytest.importorskip("torch")
    from cmhash.export.api import build_manifest, export_towers, make_ort, make_variants, reference_sets, verify_variants
    from cmhash.export.loading import Trained
    from cmhash.export.verify import RealInputs, torch_outputs
    from cmhash.backends import ModelSpec
    from cmhash.bundle import write_bundle
    from cmhash.reference import Contract
    from fixtures.towers import random_weights, torch_towers

    bits, dim, size = 16, 12, 32
    image, text = torch_towers(random_weights(bits, dim, seed=4))
    rng = np.random.default_rng(0)
    inputs = RealInputs(source="generated", pixels=rng.standard_normal((24, 3, size, size)).astype(np.float32),
                        bow=(rng.random((24, dim)) < 0.3).astype(np.float32), paired=True)
    towers = {"image": image, "text": text}
    models, _ = make_variants(export_towers(towers, inputs, bits), fp16=False, int8=False, int8_dynamic=True,
                              calibration=None, fallback=inputs, calibration_items=0)
    ort_models = make_ort(models)
    specs = {m: ModelSpec(m, n, ("batch", 3, size, size) if m == "image" else ("batch", dim), "codes", bits)
             for m, n in (("image", "pixel_values"), ("text", "bow"))}
    pytorch = {m: torch_outputs(towers[m], inputs.of(m)) for m in towers}
    references = reference_sets(towers, inputs, 8)
    results, _ = verify_variants(ort_models["models"], specs, inputs, pytorch, references,
                                 [("onnxruntime", "cpu", {"model_format": "ort"})], Contract())
    meta = {"method": "tiny", "bits": bits, "text_dim": dim, "preprocessing": {"image_size": size}}
    trained = Trained(path=tmp_path_factory.mktemp("ckpt"), meta=meta, method=None)
    report = {"inputs": {"source": "generated"}, "results": results, "map": {}, "dropped": {}}
    manifest, files = build_manifest(trained, models, references, Contract(), report, ort_models)
    path = write_bundle(tmp_path_factory.mktemp("ort") / "bundle", manifest, files)
    return path, results, ort_models["config"]


def test_ort_copies_are_verified_listed_and_carry_the_operator_list(ort_bundle):
    path, results, config = ort_bundle
    assert {(r["modality"], r["variant"], r["format"]) for r in results} == {
        (m, v, "ort") for m in ("image", "text") for v in ("fp32", "int8-dynamic")}
    assert all(r["passed"] for r in results)
    bundle = load_bundle(path)
    assert bundle.format_version == "1.3"
    assert bundle.ort_variants("image") == ("fp32", "int8-dynamic")
    assert bundle.model_file("text", "int8-dynamic", "ort") == "text.int8-dynamic.ort"
    assert bundle.manifest["ort_format"]["optimization_level"] == "extended"
    assert (path / "required_operators.config").read_text() == config
    # the list a reduced build is compiled with: every operator of the ORT files, by domain and opset
    assert "# - image.ort" in config and "# - text.int8-dynamic.ort" in config and "/tmp" not in config
    lines = [line for line in config.splitlines() if not line.startswith("#")]
    assert lines and all(line.count(";") == 2 for line in lines)
    # saved optimised: the image tower's Conv + Relu are one fused onnxruntime operator
    assert any(line.startswith("com.microsoft;1;") and "FusedConv" in line for line in lines)
    assert not any(line.startswith("ai.onnx;") and "Relu" in line for line in lines)
    assert all(bundle.manifest["files"][f] for f in ("image.ort", "text.int8-dynamic.ort", "required_operators.config"))


def test_encoder_loads_ort_files_with_the_codes_of_the_onnx_ones(ort_bundle):
    path, _, _ = ort_bundle
    x = np.random.default_rng(2).standard_normal((5, 3, 32, 32)).astype(np.float32)
    for variant in ("fp32", "int8-dynamic"):
        onnx_enc = Encoder.load(path, variant=variant, model_format="onnx")
        ort_enc = Encoder.load(path, variant=variant, model_format="ort", verify=True)
        auto = Encoder.load(path, variant=variant)  # the ORT copy: the CPU provider alone runs it
        assert ort_enc.verification["passed"] and auto.model_format == "ort" and onnx_enc.model_format == "onnx"
        assert ort_enc.info()["models"]["image"]["file"] == ("image.ort" if variant == "fp32" else "image.int8-dynamic.ort")
        a, b = onnx_enc.hash_preprocessed("image", x, return_continuous=True), ort_enc.hash_preprocessed(
            "image", x, return_continuous=True)
        assert np.abs(a - b).max() < 1e-4 if variant == "fp32" else ((a >= 0) == (b >= 0)).mean() > 0.95
        # a cold load reads only the files it runs
        assert set(auto.bundle.files) == {f"{m}.ort" if variant == "fp32" else f"{m}.{variant}.ort" for m in ("image", "text")}
    with pytest.raises(BundleError, match="no fp16 image model"):
        Encoder.load(path, variant="fp16", model_format="ort")


def test_a_bundle_without_ort_copies_loads_onnx_and_refuses_ort(bundle):
    assert Encoder.load(bundle).model_format == "onnx"
    with pytest.raises(BundleError, match="no ORT-format fp32 image model .*export it with --ort"):
        Encoder.load(bundle, model_format="ort")


def test_cmhash_verify_checks_the_ort_copies(ort_bundle, capsys):
    path, _, _ = ort_bundle
    assert main(["verify", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ort"] == {"fp32": True, "int8-dynamic": True}
    assert {(r["variant"], r["format"]) for r in report["results"]} == {
        (v, f) for v in ("fp32", "int8-dynamic") for f in ("onnx", "ort")}
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "int8-dynamic (ort)" in out and "ORT-format copies that pass: fp32, int8-dynamic" in out


def test_a_tampered_ort_file_fails_its_checksum(ort_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(ort_bundle[0], copy)
    data = bytearray((copy / "image.ort").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "image.ort").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="image.ort fails its checksum"):
        Encoder.load(copy)  # the ORT copy is what a CPU load reads
    Encoder.load(copy, model_format="onnx")  # the ONNX files are intact, and the ORT one unread
    assert main(["verify", str(copy)]) == 2


def test_a_manifest_naming_an_unlisted_ort_file_is_refused(ort_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(ort_bundle[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["modalities"]["image"]["ort"]["fp32"]["file"] = "elsewhere.ort"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="ort.fp32.file is not listed"):
        load_bundle(copy)


def test_bench_row_of_a_missing_provider_says_why(bundle):
    from cmhash.bench import bench_bundle, format_table

    record = bench_bundle(bundle, providers=[MISSING], cold_runs=1, warmup=0, repeats=2)
    (row,) = record["rows"]
    assert row["provider"] == MISSING and MISSING in row["error"] and "p50_ms" not in row
    assert "failed: " in format_table(record) and "failed: " in format_table(record, markdown=True)
