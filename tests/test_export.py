"""Export end to end on a real checkpoint: the ``toy`` method trained here for one epoch on the
real MIRFlickr photos and tags of mirflickr-mini in the test data folder (32-pixel open_clip
preprocessing, 1,386-column tag vectors), exported with its fp16 and int8 variants, then
hashed through ``Encoder`` and compared with the PyTorch towers fed by the training pipeline."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

import cmhash  # noqa: E402
from cmhash import pack_codes  # noqa: E402
from cmhash.bundle import load_bundle  # noqa: E402
from cmhash.cli import main  # noqa: E402
from cmhash.encoder import Encoder  # noqa: E402
from cmhash.errors import (  # noqa: E402
    BackendUnavailableError,
    BundleChecksumError,
    BundleError,
    ExportError,
    ReferenceCheckError,
    VerificationError,
)
from cmhash.export import export_checkpoint, export_tower, float_nodes, keep_passing, quantize_int8  # noqa: E402
from cmhash.metrics import mean_average_precision  # noqa: E402
from cmhash.reference import check_bundle, read_reference, reference_file  # noqa: E402
from fixtures.data import DATA, require  # noqa: E402
from fixtures.roundtrip import bit_agreement  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROOT = Path(__file__).resolve().parents[1]
MINI = DATA / "mirflickr-mini"
MANIFEST = require(MINI / "manifest.jsonl", module=True)
sys.path.insert(0, str(ROOT / "tests" / "training"))
import toy_method  # noqa: E402,F401  (registers "toy")

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch checkpoint of ``toy`` on real photos and tags, and its datasets."""
    from cmhash.training.run import load_config
    from cmhash.training.data import CrossModalDataset, build_transform, load_mirflickr_mini, make_split, preprocess_config
    from cmhash.training.method import DatasetInfo
    from cmhash.training.trainer import Trainer, build_method

    out = tmp_path_factory.mktemp("run")
    data = load_mirflickr_mini(MINI, check_images=False)
    split = make_split(len(data), {"query": 60, "train": 300, "seed": 0})
    pre = preprocess_config(SIZE)
    transform = build_transform(pre)
    train = CrossModalDataset(data, split.train, transform)
    info = DatasetInfo(n_train=len(train), n_labels=data.num_labels, text_dim=data.vocabulary.dim,
                       train_labels=train.labels, label_names=data.label_names, image_size=SIZE,
                       preprocessing=pre, vocabulary=data.vocabulary.to_dict())
    config = load_config(None, ["method=toy", f"train.out_dir={out}", "train.device=cpu", "train.batch_size=32",
                                "train.progress=false", "train.epochs=1", "model.bits=32"])
    method = build_method(config, info)
    query = CrossModalDataset(data, split.query, transform)
    database = CrossModalDataset(data, split.database[:200], transform)
    Trainer(config, method, train, query, database).fit()
    return {"checkpoint": out / "last", "data": data, "split": split, "transform": transform, "method": method,
            "query": query, "database": database}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("export") / "bundle"
    report = export_checkpoint(trained["checkpoint"], bundle, fp16=True, int8=True, verify_data=MANIFEST,
                               verify_items=160, archive=True)
    return bundle, report


def torch_codes(tower, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return tower.eval()(batch).numpy()


def stack(dataset, what: int) -> torch.Tensor:
    return torch.stack([torch.as_tensor(dataset[i][what]).float() for i in range(len(dataset))])


# --- round trip ---------------------------------------------------------------------------------------


def test_round_trip_encoder_codes_equal_the_pytorch_towers(trained, exported):
    """Photos through the SDK (Pillow preprocessing + onnxruntime) against the PyTorch towers
    fed by the training pipeline (open_clip transform): the same bits, the same mAP."""
    bundle, _ = exported
    method, data = trained["method"], trained["data"]
    items = np.concatenate([trained["split"].query, trained["split"].database[:140]])
    paths = [data.images.paths[i] for i in items]
    bows = np.stack([data.text(i) for i in items])
    pixels = torch.stack([trained["transform"](data.images.load(i)) for i in items])
    ref_image = torch_codes(method.image_tower(), pixels)
    ref_text = torch_codes(method.text_tower(), torch.from_numpy(bows))

    enc = Encoder.load(bundle, threads=1)
    image_codes = enc.hash_images(paths)
    text_codes = enc.hash_texts(bows)
    assert bit_agreement(image_codes, ref_image) >= 0.999
    assert bit_agreement(text_codes, ref_text) >= 0.999
    tags = [json.loads(line)["tags"] for line in MANIFEST.read_text().splitlines()]
    assert np.array_equal(enc.hash_texts([enc.vocabulary.encode_indices(tags[i]) for i in items]), text_codes)

    labels = data.labels[items]
    q, db = slice(0, 60), slice(60, None)
    torch_image, torch_text = pack_codes(ref_image, input="sign"), pack_codes(ref_text, input="sign")
    for (a, b), (ta, tb) in [((image_codes, text_codes), (torch_image, torch_text)),
                             ((text_codes, image_codes), (torch_text, torch_image))]:
        sdk_map = mean_average_precision(a[q], b[db], labels[q], labels[db])
        ref_map = mean_average_precision(ta[q], tb[db], labels[q], labels[db])
        assert abs(sdk_map - ref_map) <= 0.005
        assert sdk_map > 0.3  # trained codes retrieve, random ones would not be compared at all


def test_report_has_every_modality_and_variant(exported):
    bundle, report = exported
    assert report["passed"]
    got = {(r["modality"], r["variant"], r["backend"]) for r in report["results"]}
    assert got == {(m, v, "onnxruntime") for m in ("image", "text") for v in ("fp32", "fp16", "int8")}
    for r in report["results"]:
        assert r["items"] == 160
        if r["variant"] == "fp32":
            assert r["max_abs_delta"] <= 1e-4 and r["bit_agreement"] >= 0.999
        else:
            assert 0.97 <= r["bit_agreement"] <= 1.0
    assert report["inputs"]["labels"] and report["inputs"]["skipped"] == 0
    assert set(report["map"]) == {"pytorch", "fp32", "fp16", "int8"}
    assert abs(report["map"]["fp32"]["delta_i2t"]) <= 0.005 and abs(report["map"]["fp32"]["delta_t2i"]) <= 0.005
    json.dumps(report)  # the CLI prints it


def test_bundle_contents_and_variants(exported, trained):
    bundle_dir, report = exported
    bundle = load_bundle(bundle_dir)
    assert bundle.method == "toy" and bundle.bits == 32
    assert bundle.label_names == trained["data"].label_names
    assert bundle.variants("image") == bundle.variants("text") == ("fp32", "fp16", "int8")
    assert sorted(bundle.files) == ["image.fp16.onnx", "image.int8.onnx", "image.onnx", "reference/image.npz",
                                    "reference/text.npz", "text.fp16.onnx", "text.int8.onnx", "text.onnx", "vocab.json"]
    provenance = bundle.manifest["provenance"]
    assert provenance["training_config"]["method"] == "toy"
    assert provenance["metrics"]["last"]["map_i2t"] > 0
    assert provenance["export"]["opset"] == 17
    assert bundle.image_preprocessor().output_size == (SIZE, SIZE)
    assert load_bundle(report["archive"]).files == bundle.files

    fp32 = Encoder.load(bundle_dir, threads=1)
    photos = sorted((MINI / "images").glob("*.jpg"))[:64]
    reference = fp32.hash_images(photos, return_continuous=True)
    for variant in ("fp16", "int8"):
        enc = Encoder.load(bundle_dir, threads=1, variant=variant)
        assert variant in repr(enc)
        assert bit_agreement(enc.hash_images(photos), reference) >= 0.97


def test_onnx_files_are_checked_opset_17_with_a_dynamic_batch(exported):
    bundle = load_bundle(exported[0])
    for name, data in bundle.files.items():
        if not name.endswith(".onnx"):
            continue
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}[""] >= 17
        (inp,) = model.graph.input
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # variants keep float32 IO
        assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    enc = Encoder.load(exported[0], threads=1)
    for n in (1, 7):
        assert enc.hash_texts(np.zeros((n, enc.text_dim), np.float32)).shape == (n, 4)


def test_int8_keeps_layernorm_gelu_softmax_and_the_hash_head_in_float():
    """A small transformer block: the excluded neighbourhoods stay float, the rest is int8."""
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(16, 32)
            self.norm = torch.nn.LayerNorm(32)
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
            self.head = torch.nn.Linear(32, 16)

        def forward(self, x):
            h = self.embed(x.view(x.shape[0], 4, 16))
            n = self.norm(h)
            h = h + self.attn(n, n, n, need_weights=False)[0]
            h = h + self.mlp(self.norm(h))
            return torch.tanh(self.head(h.mean(1)))

    block = Block().eval()
    data = torch.randn(64, 64)
    model_bytes = export_tower(block, data[:4], "bow", 16, "test")
    model = onnx.load_from_string(model_bytes)
    keep = set(float_nodes(model))
    by_op = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, []).append(node.name)
    for op in ("LayerNormalization", "Softmax", "Erf", "Tanh"):
        assert set(by_op[op]) <= keep, op
    head = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    assert head.name in keep

    q_bytes, info = quantize_int8(model_bytes, "bow", data.numpy(), "test")
    q = onnx.load_from_string(q_bytes)
    assert info["quantize_nodes"] > 0
    dq_outputs = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in q.graph.node:
        fed_by_int8 = any(i in dq_outputs for i in node.input)
        if node.op_type in ("LayerNormalization", "Softmax", "Erf", "Tanh") or node.name == head.name:
            assert not fed_by_int8, f"{node.op_type} {node.name} reads int8 values"
    assert any(any(i in dq_outputs for i in n.input) for n in q.graph.node if n.op_type in ("MatMul", "Gemm"))

    import onnxruntime as ort

    got = ort.InferenceSession(q_bytes, providers=["CPUExecutionProvider"]).run(None, {"bow": data.numpy()})[0]
    assert ((got >= 0) == (block(data).detach().numpy() >= 0)).mean() >= 0.97


# --- the bundle checks itself --------------------------------------------------------------------------


def test_bundle_carries_reference_inputs_and_pytorch_codes(exported, trained):
    bundle = load_bundle(exported[0])
    reference = bundle.manifest["reference"]
    assert reference["contract"] == {"bit_floor": 0.97, "fp32_tolerance": 1e-4, "fp32_bit_floor": 0.999}
    assert {m: e["file"] for m, e in reference["modalities"].items()} == {"image": "reference/image.npz",
                                                                          "text": "reference/text.npz"}
    method = trained["method"]
    for modality, tower in (("image", method.image_tower()), ("text", method.text_tower())):
        inputs, outputs = read_reference(bundle, modality)
        assert len(inputs) == reference["modalities"][modality]["items"] == 16
        assert np.abs(torch_codes(tower, torch.from_numpy(inputs)) - outputs).max() <= 1e-6  # PyTorch's own
    for variant in ("fp32", "fp16", "int8"):
        enc = Encoder.load(exported[0], variant=variant, threads=1, verify=True)
        assert enc.verification["passed"] and len(enc.verification["results"]) == 2


def test_cmhash_verify_prints_every_variant_and_exits_by_the_chosen_one(exported, capsys):
    assert main(["verify", str(exported[0]), "--variant", "int8", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["variants"] == {"fp32": True, "fp16": True, "int8": True} and report["chosen"]["passed"]
    assert {(r["modality"], r["variant"]) for r in report["results"]} == {
        (m, v) for m in ("image", "text") for v in ("fp32", "fp16", "int8")}
    assert main(["verify", str(exported[1]["archive"]), "--threads", "1"]) == 0  # the zip archive too
    assert "fp32: passes here" in capsys.readouterr().out


def test_a_variant_below_the_contract_on_this_machine_names_the_ones_that_pass(exported, tmp_path, capsys):
    copy = Path(shutil.copytree(exported[0], tmp_path / "strict"))
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # fp32 must now equal PyTorch exactly; onnxruntime's kernels round differently, while how
    # many of int8's bits agree depends on the data (it may be all of them)
    manifest["reference"]["contract"]["fp32_tolerance"] = 0.0
    manifest_path.write_text(json.dumps(manifest))
    report = check_bundle(copy, threads=1)
    fp32_deltas = [r["max_abs_delta"] for r in report["results"] if r["variant"] == "fp32"]
    assert max(fp32_deltas) > 0 and report["variants"]["fp32"] is False and report["variants"]["int8"] is True
    passing = [v for v, ok in report["variants"].items() if ok]
    with pytest.raises(ReferenceCheckError, match="fp32 models .* do not reproduce") as info:
        Encoder.load(copy, variant="fp32", threads=1, verify=True)
    assert f"variants that do: {', '.join(passing)}" in str(info.value)
    assert info.value.report["passing_variants"] == passing
    assert isinstance(info.value, cmhash.CmhashError)
    assert main(["verify", str(copy), "--variant", "fp32", "--threads", "1"]) == 1
    assert "fp32: FAILS here" in capsys.readouterr().out
    assert main(["verify", str(copy), "--variant", "int8", "--threads", "1"]) == 0


def test_a_tampered_reference_file_fails_its_checksum(exported, tmp_path, capsys):
    copy = Path(shutil.copytree(exported[0], tmp_path / "tampered"))
    inputs, outputs = read_reference(load_bundle(copy), "text")
    (copy / "reference" / "text.npz").write_bytes(reference_file(inputs, -outputs))  # every code flipped
    with pytest.raises(BundleChecksumError, match="reference/text.npz fails its checksum"):
        Encoder.load(copy, verify=True)
    assert main(["verify", str(copy)]) == 2
    assert "reference/text.npz fails its checksum" in capsys.readouterr().err


# --- failures ------------------------------------------------------------------------------------------


def test_a_failing_variant_is_left_out_and_the_rest_written(trained, tmp_path, caplog):
    out = tmp_path / "bundle"
    report = export_checkpoint(trained["checkpoint"], out, fp16=True, int8=True, verify_data=MANIFEST, verify_items=96,
                               bit_floor=1.0)  # int8 cannot agree on every bit; fp32 has its own contract
    failed = {(r["modality"], r["variant"]) for r in report["results"] if not r["passed"]}
    assert failed and {variant for _, variant in failed} <= {"int8", "fp16"} and "int8" in report["dropped"]
    assert set(report["dropped"]) == {variant for _, variant in failed} and not report["passed"]
    assert "the int8 variant is left out" in caplog.text
    bundle = load_bundle(out)
    assert bundle.variants("image") == bundle.variants("text") == tuple(report["variants"])
    assert "int8" not in report["variants"] and "fp32" in report["variants"]
    assert not any(".int8." in name for name in bundle.files)
    assert "int8" in bundle.manifest["provenance"]["export"]["verification"]["dropped"]


def test_strict_fails_the_whole_export_and_writes_nothing(trained, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(VerificationError, match="int8") as info:
        export_checkpoint(trained["checkpoint"], out, int8=True, verify_data=MANIFEST, verify_items=96, bit_floor=1.0,
                          strict=True)
    assert not info.value.report["passed"] and "int8" in info.value.report["dropped"]
    assert not out.exists()
    assert main(["export", str(trained["checkpoint"]), "--out", str(out), "--int8", "--verify-data", str(MANIFEST),
                 "--verify-items", "96", "--bit-floor", "1.0", "--strict"]) == 1
    assert not out.exists()


def test_fp32_failing_is_always_fatal(trained, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(VerificationError, match="fp32") as info:  # no fp32 run is bit-exact to 0.0
        export_checkpoint(trained["checkpoint"], out, fp16=True, verify_data=MANIFEST, verify_items=32,
                          fp32_tolerance=0.0)
    assert "fp32" in info.value.report["dropped"]
    assert not out.exists()


def test_keep_passing_drops_a_variant_from_every_modality():
    def row(modality, variant, passed, ref_passed=True):
        return {"modality": modality, "variant": variant, "backend": "onnxruntime", "items": 100, "bit_agreement": 0.95,
                "max_abs_delta": 0.3, "criterion": "bit_agreement >= 0.97", "passed": passed and ref_passed,
                "reference": {"items": 16, "bit_agreement": 0.9 if not ref_passed else 1.0, "passed": ref_passed}}

    assert keep_passing([row("image", "fp32", True), row("text", "fp32", True)]) == {}
    dropped = keep_passing([row("image", "int8", True), row("text", "int8", False), row("image", "fp16", True, False)])
    assert set(dropped) == {"int8", "fp16"}
    assert dropped["int8"].startswith("text int8 on onnxruntime") and "16 reference items" in dropped["fp16"]


def test_damaged_verification_inputs_are_skipped_with_reasons(trained, tmp_path):
    photos = sorted((MINI / "images").glob("*.jpg"))[:24]
    good = photos[0].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "not_an_image.jpg").write_bytes(b"GIF89a nonsense")
    big = io.BytesIO()
    Image.new("L", (12000, 10000)).save(big, "PNG")  # 120 Mpixel: over the decompression-bomb limit
    (tmp_path / "bomb.png").write_bytes(big.getvalue())
    lines = [json.dumps({"image": str(p), "tags": [3, 7], "labels": ["sky"]}) for p in photos]
    for name in ("truncated.jpg", "empty.jpg", "not_an_image.jpg", "bomb.png", "missing.jpg"):
        lines.append(json.dumps({"image": name, "tags": [1], "labels": ["sky"]}))
    lines += ["{not json", json.dumps({"image": str(photos[1]), "tags": [99999], "labels": ["sky"]}),
              json.dumps({"image": str(photos[2]), "tags": [1], "labels": ["no such label"]})]
    manifest = tmp_path / "verify.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    report = export_checkpoint(trained["checkpoint"], tmp_path / "bundle", verify_data=manifest)
    assert report["passed"] and report["inputs"]["image_items"] == 24
    assert report["inputs"]["skipped"] == 8
    reasons = " ".join(s["reason"] for s in report["inputs"]["skipped_examples"])
    assert "truncated" in reasons and "0 bytes" in reasons


def test_missing_or_foreign_checkpoint_and_no_inputs(trained, tmp_path):
    with pytest.raises(ExportError, match="cannot read the checkpoint"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "b1", verify_data=MANIFEST)
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted((MINI / "images").glob("*.jpg"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ExportError, match="no text inputs"):  # images only, and no training data to add texts
        export_checkpoint(trained["checkpoint"], tmp_path / "b2", verify_data=folder)
    with pytest.raises(ExportError, match="verify_data"):
        export_checkpoint(trained["checkpoint"], tmp_path / "b3")
    assert not any((tmp_path / f"b{i}").exists() for i in (1, 2, 3))


def test_tensorrt_without_a_gpu_fails_before_any_work(trained, tmp_path):
    from cmhash.backends.tensorrt_backend import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendUnavailableError, match="--tensorrt needs TensorRT"):
        export_checkpoint(trained["checkpoint"], tmp_path / "b", tensorrt=True, verify_data=MANIFEST)


def test_variant_not_in_the_bundle(exported, tmp_path):
    bundle = tmp_path / "fp32only"
    export_checkpoint(exported[1]["checkpoint"], bundle, verify_data=MANIFEST, verify_items=32)
    assert load_bundle(bundle).variants("image") == ("fp32",)
    with pytest.raises(BundleError, match="no int8"):
        Encoder.load(bundle, variant="int8")
    with pytest.raises(ValueError, match="unknown variant"):
        Encoder.load(exported[0], variant="int4")


# --- command line ---------------------------------------------------------------------------------------


def test_cli_export_json_and_bench_with_the_pytorch_baseline(trained, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", str(trained["checkpoint"]), "--out", str(out), "--fp16", "--int8-dynamic", "--verify-data",
                 str(MANIFEST), "--verify-items", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and len(report["results"]) == 6
    assert load_bundle(out).variants("image") == ("fp32", "fp16", "int8-dynamic")
    assert main(["export", str(trained["checkpoint"]), "--out", str(out), "--verify-data", str(MANIFEST)]) == 2
    assert "exists" in capsys.readouterr().err

    record_file = tmp_path / "bench.json"
    assert main(["bench", str(out), "--variants", "fp32,int8-dynamic", "--cold-runs", "1", "--repeats", "3",
                 "--warmup", "1", "--threads", "1", "--data", str(MANIFEST), "--json", "--out", str(record_file)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(record_file.read_text())
    rows = {(r["variant"], r["format"], r["provider"]): r for r in record["rows"]}
    assert set(rows) == {("fp32", "onnx", "CPUExecutionProvider"), ("int8-dynamic", "onnx", "CPUExecutionProvider"),
                         ("fp32", "pytorch", "pytorch-eager")}
    for r in rows.values():
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["items_per_s"] > 0
    fp32, dynamic = rows[("fp32", "onnx", "CPUExecutionProvider")], rows[("int8-dynamic", "onnx", "CPUExecutionProvider")]
    assert fp32["bit_agreement"] == 1.0 and 0.9 < dynamic["bit_agreement"] <= 1.0
    assert record["items"] > 100 and all(0 < r[k] <= 1 for r in (fp32, dynamic) for k in ("map_i2t", "map_t2i"))


def test_cli_export_without_torch_names_the_extra(tmp_path):
    script = ("import sys; sys.modules['torch'] = None; from cmhash.cli import main; "
              f"sys.exit(main(['export', 'ckpt', '--out', {str(tmp_path / 'b')!r}]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 2
    assert 'pip install "cmhash-sdk[export]"' in out.stderr and "torch" in out.stderr


def test_tensorrt_precision_per_variant():
    from cmhash.backends.tensorrt_backend import default_precision

    assert default_precision("fp32") == "fp32"
    assert default_precision("fp16") == default_precision("int8") == "model"  # typed by the file, TRT 10 and 11


@pytest.mark.skipif("not __import__('cmhash.backends.tensorrt_backend', fromlist=['x']).tensorrt_available()[0]",
                    reason="needs TensorRT and a GPU")
def test_tensorrt_engines_are_built_cached_and_verified(trained, tmp_path):
    cache = tmp_path / "engines"
    report = export_checkpoint(trained["checkpoint"], tmp_path / "bundle", fp16=True, int8=True, tensorrt=True,
                               verify_data=MANIFEST, verify_items=128, tensorrt_cache_dir=cache)
    trt_rows = [r for r in report["results"] if r["backend"] == "tensorrt"]
    assert len(trt_rows) == 6 and all(r["passed"] for r in trt_rows)
    assert len(list(cache.glob("*.plan"))) == 6
    enc = Encoder.load(tmp_path / "bundle", backend="tensorrt", device="cuda", variant="fp16", cache_dir=cache)
    assert enc.hash_images(sorted((MINI / "images").glob("*.jpg"))[:8]).shape == (8, 4)
