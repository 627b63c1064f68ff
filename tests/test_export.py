"""Export end to end on a real checkpoint: the ``toy`` method trained here for one epoch on the
real MIRFlickr photos and tags of ../shared/data/mirflickr-mini (32-pixel open_clip
preprocessing, 1,386-column tag vectors), exported with its fp16 and int8 variants, then
hashed through ``Encoder`` and compared with the PyTorch towers fed by the training pipeline."""

from __future__ import annotations

import io
import json
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

from cmhash import pack_codes  # noqa: E402
from cmhash.bundle import load_bundle  # noqa: E402
from cmhash.cli import main  # noqa: E402
from cmhash.encoder import Encoder  # noqa: E402
from cmhash.errors import BackendUnavailableError, BundleError, ExportError, VerificationError  # noqa: E402
from cmhash.export import export_checkpoint, export_tower, float_nodes, quantize_int8  # noqa: E402
from cmhash.metrics import mean_average_precision  # noqa: E402
from fixtures.roundtrip import bit_agreement  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "mirflickr-mini"
MANIFEST = MINI / "manifest.jsonl"
sys.path.insert(0, str(ROOT / "tests" / "training"))
import toy_method  # noqa: E402,F401  (registers "toy")

if not MANIFEST.exists():
    pytest.skip(f"shared data not present: {MINI}", allow_module_level=True)

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
    assert sorted(bundle.files) == ["image.fp16.onnx", "image.int8.onnx", "image.onnx", "text.fp16.onnx",
                                    "text.int8.onnx", "text.onnx", "vocab.json"]
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


# --- failures ------------------------------------------------------------------------------------------


def test_below_the_floor_is_a_typed_error_and_nothing_is_written(trained, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(VerificationError, match="int8") as info:
        export_checkpoint(trained["checkpoint"], out, int8=True, verify_data=MANIFEST, verify_items=96, bit_floor=1.0)
    report = info.value.report
    failed = {(r["modality"], r["variant"]) for r in report["results"] if not r["passed"]}
    assert failed and all(variant == "int8" for _, variant in failed)
    assert not out.exists()


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
    assert main(["bench", str(out), "--batch-sizes", "1,4", "--repeats", "3", "--warmup", "1", "--threads", "1",
                 "--json", "--out", str(record_file)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(record_file.read_text())
    rows = {(r["modality"], r["backend"], r["variant"], r["batch"]) for r in record["rows"]}
    for modality in ("image", "text"):
        for batch in (1, 4):
            assert (modality, "pytorch-eager", "fp32", batch) in rows
            assert (modality, "onnxruntime", "fp16", batch) in rows
            assert (modality, "onnxruntime", "int8-dynamic", batch) in rows
    for r in record["rows"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["items_per_s"] > 0
        assert r["speedup"] > 0


def test_cli_export_without_torch_names_the_extra(tmp_path):
    script = ("import sys; sys.modules['torch'] = None; from cmhash.cli import main; "
              f"sys.exit(main(['export', 'ckpt', '--out', {str(tmp_path / 'b')!r}]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 2
    assert 'pip install "cmhash-sdk[export]"' in out.stderr and "torch" in out.stderr


def test_tensorrt_precision_per_variant():
    from cmhash.export.variants import tensorrt_precision

    assert tensorrt_precision("fp32") == "fp32"
    assert tensorrt_precision("fp16") == tensorrt_precision("int8") == "model"  # typed by the file, TRT 10 and 11


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
