"""Encoder end to end: bundles of tiny towers built here, codes against numpy and torch
references, every input form, bad input, backends, and the light-import promises."""

import io
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cmhash
from cmhash import pack_codes
from cmhash.backends import (
    BACKENDS,
    REGISTRY,
    Backend,
    backend_class,
    backends_for,
    create_backend,
    default_device,
)
from cmhash.backends.tensorrt_backend import builder_settings, cache_key, tensorrt_available
from cmhash.encoder import Encoder
from cmhash.errors import (
    BackendUnavailableError,
    BundleError,
    CodeFormatError,
    ImageDecodeError,
    ImageTooLargeError,
    ModelSignatureError,
    ReferenceCheckError,
    TextInputError,
    UnknownTextError,
    UnknownTextWarning,
    UnsupportedInputError,
)
from cmhash.preprocess import ImagePreprocessor, load_image
from cmhash.text import Vocabulary

pytest.importorskip("onnx", reason="the tests build their ONNX towers with the onnx package")
pytest.importorskip("onnxruntime")

from fixtures.data import DATA  # noqa: E402
from fixtures.towers import (  # noqa: E402
    WORDS,
    image_onnx,
    image_reference,
    make_bundle,
    random_weights,
    text_onnx,
    text_reference,
    torch_export,
    torch_towers,
)

PHOTOS = sorted((DATA / "mirflickr-mini" / "images").glob("*.jpg"))
SIZE = 32


def photos_or_generated(n: int) -> list:
    """Real photos where the shared data is present, else generated images of many sizes."""
    if PHOTOS:
        return PHOTOS[:n]
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (rng.integers(20, 90), rng.integers(20, 90), 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", bits=32, image_size=SIZE)


@pytest.fixture(scope="module")
def encoder(bundle):
    with Encoder.load(bundle[0], threads=1) as enc:
        yield enc


def assert_codes_match(codes: np.ndarray, reference: np.ndarray):
    """Packed codes equal the reference's signs wherever the sign is not a rounding call."""
    decided = np.abs(reference) > 1e-4
    assert decided.mean() > 0.99
    bits = np.unpackbits(codes, axis=-1, bitorder="little").astype(bool)
    assert np.array_equal(bits[decided], (reference >= 0)[decided])


# --- codes against references ------------------------------------------------------------------


def test_image_codes_match_the_numpy_reference(encoder, bundle):
    _, weights = bundle
    images = photos_or_generated(20)
    codes = encoder.hash_images(images, batch_size=7)
    assert codes.shape == (20, 4) and codes.dtype == np.uint8
    pixels = ImagePreprocessor(image_size=SIZE)(images)
    reference = image_reference(weights, pixels)
    assert_codes_match(codes, reference)
    continuous = encoder.hash_images(images, return_continuous=True)
    assert continuous.dtype == np.float32 and continuous.shape == (20, 32)
    assert np.abs(continuous - reference).max() < 1e-5
    assert np.array_equal(pack_codes(continuous, input="sign"), codes)


@pytest.mark.filterwarnings("ignore::cmhash.errors.UnknownTextWarning")  # "" and "zebra", on purpose
def test_text_codes_match_the_numpy_reference(encoder, bundle):
    _, weights = bundle
    texts = ["a cat on the beach at sunset", "Snow, trees & street-lights at night", "", "zebra"]
    codes = encoder.hash_texts(texts)
    vocab = Vocabulary.from_words(WORDS)
    reference = text_reference(weights, vocab.encode_batch(texts))
    assert_codes_match(codes, reference)
    assert np.abs(encoder.hash_texts(texts, return_continuous=True) - reference).max() < 1e-5


@pytest.mark.filterwarnings("ignore::cmhash.errors.UnknownTextWarning")  # the empty text, on purpose
def test_full_pipeline_matches_torch_and_open_clip(tmp_path):
    """torch tower on open_clip's transform (the training path) == Encoder on raw files."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    weights = random_weights(64, len(WORDS), seed=3)
    image_tower, text_tower = torch_towers(weights)
    directory, _ = make_bundle(
        tmp_path / "torch-bundle",
        bits=64,
        image_size=SIZE,
        seed=3,
        image_model=torch_export(image_tower, torch.zeros(2, 3, SIZE, SIZE), "pixel_values"),
        text_model=torch_export(text_tower, torch.zeros(2, len(WORDS)), "bow"),
    )
    encoder = Encoder.load(directory, backend="onnxruntime")
    images = photos_or_generated(64)
    transform = open_clip.image_transform(SIZE, is_train=False)
    with torch.no_grad():
        # decoded as training's data sources decode (reduced JPEG decoding down to SIZE)
        pixels = torch.stack([transform(load_image(image, min_side=SIZE)) for image in images])
        expected_image = image_tower(pixels).numpy()
        texts = ["cat sofa", "sea, sky and sunset", "", "Dog in the snow"]
        bow = torch.from_numpy(Vocabulary.from_words(WORDS).encode_batch(texts))
        expected_text = text_tower(bow).numpy()
    got_image = encoder.hash_images(images, batch_size=16, return_continuous=True)
    assert np.abs(got_image - expected_image).max() < 1e-5
    assert_codes_match(encoder.hash_images(images, batch_size=16), expected_image)
    assert np.abs(encoder.hash_texts(texts, return_continuous=True) - expected_text).max() < 1e-5
    assert_codes_match(encoder.hash_texts(texts), expected_text)


# --- input forms ---------------------------------------------------------------------------


def test_every_image_form_gives_the_same_code(encoder, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    expected = encoder.hash(pixels)
    assert expected.shape == (4,) and expected.dtype == np.uint8
    with open(path, "rb") as fh:
        from_file = encoder.hash(fh)
    for code in (encoder.hash(path), encoder.hash(str(path)), encoder.hash(data), encoder.hash(io.BytesIO(data)),
                 encoder.hash(Image.open(path)), from_file):
        assert np.array_equal(code, expected)
    assert encoder.hash(pixels, return_continuous=True).shape == (32,)


def test_batches_stream_and_agree(encoder):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(10)]
    all_at_once = encoder.hash_images(images)
    assert np.array_equal(encoder.hash_images(iter(images), batch_size=3), all_at_once)  # a generator
    assert np.array_equal(encoder.hash_images(np.stack(images)), all_at_once)  # (N, H, W, C)
    assert np.array_equal(np.stack([encoder.hash(i) for i in images]), all_at_once)
    assert encoder.hash_images([]).shape == (0, 4)
    assert encoder.hash_images([], return_continuous=True).shape == (0, 32)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.hash_images(images, batch_size=0)


@pytest.mark.filterwarnings("ignore::cmhash.errors.UnknownTextWarning")  # the empty text, on purpose
def test_texts_tags_and_bow_agree(encoder):
    vocab = Vocabulary.from_words(WORDS)
    texts = ["Cat on a SOFA", "sea sky", ""]
    tags = [["cat", "sofa"], ["sea", "sky"], []]
    expected = encoder.hash_texts(texts)
    assert expected.shape == (3, 4)
    assert np.array_equal(encoder.hash_texts(tags), expected)
    assert np.array_equal(encoder.hash_texts(vocab.encode_batch(texts)), expected)
    assert np.array_equal(encoder.hash_texts(vocab.encode_batch(texts).astype(bool)), expected)
    assert np.array_equal(encoder.hash_texts([texts[0], tags[1], vocab.encode(texts[2])]), expected)  # mixed
    assert np.array_equal(encoder.hash_text("cat on a sofa"), expected[0])
    assert np.array_equal(encoder.hash_text(b"cat on a sofa"), expected[0])
    assert np.array_equal(encoder.hash_text(vocab.encode("sea sky")), expected[1])
    assert np.array_equal(encoder.hash_texts(texts, batch_size=1), expected)


def test_empty_and_very_long_texts(encoder, bundle):
    _, weights = bundle
    zero_code = pack_codes(text_reference(weights, np.zeros((1, len(WORDS)))), input="sign")[0]
    assert np.array_equal(encoder.hash_text("", on_unknown="ignore"), zero_code)  # the code of the empty BoW
    long_text = "word " * 400_000 + "cat"
    assert np.array_equal(encoder.hash_text(long_text), encoder.hash_text("cat"))


def test_texts_with_no_known_word_warn_raise_or_are_reported(encoder, bundle):
    """"zzzz qqqq" hashes as the empty text: one warning per call by default, an error on
    request, and the positions on request; known texts stay silent."""
    _, weights = bundle
    zero_code = pack_codes(text_reference(weights, np.zeros((1, len(WORDS)))), input="sign")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.hash_texts(["a cat", ["sea", "sky"]])
        encoder.hash_texts(np.zeros((2, len(WORDS))))  # BoW arrays are taken as given
    with pytest.warns(UnknownTextWarning, match="1 of 1 texts") as caught:
        assert np.array_equal(encoder.hash_text("zzzz qqqq"), zero_code)
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller
    texts = ["a cat", "zzzz", "", ["qqqq"], "sea"]
    with pytest.warns(UnknownTextWarning, match=r"3 of 5 texts.*text 1") as caught:
        codes, unknown = encoder.hash_texts(texts, batch_size=2, return_unknown=True)
    assert len(caught) == 1 and unknown == [1, 2, 3]
    assert np.array_equal(codes, encoder.hash_texts(texts, on_unknown="ignore"))
    with pytest.raises(UnknownTextError, match="text 1 .'zzzz'."):
        encoder.hash_texts(texts, on_unknown="error")
    with pytest.raises(UnknownTextError):
        encoder.hash_text("zzzz", on_unknown="error")
    with pytest.raises(ValueError, match="on_unknown"):
        encoder.hash_text("cat", on_unknown="loud")


# --- bad input -----------------------------------------------------------------------------


def test_bad_texts(encoder):
    with pytest.raises(TextInputError, match="UTF-8"):
        encoder.hash_text(b"caf\xe9")
    with pytest.raises(TextInputError, match="shape"):
        encoder.hash_texts(np.zeros((2, 5)))
    with pytest.raises(TextInputError, match="only 0 and 1"):
        encoder.hash_texts(np.full((1, len(WORDS)), 2.0))
    with pytest.raises(UnsupportedInputError, match="hash_text for a single"):
        encoder.hash_texts("a single string")
    with pytest.raises(UnsupportedInputError):
        encoder.hash_text(12)


def test_bad_images(encoder, tmp_path):
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data, "JPEG")
    with pytest.raises(ImageDecodeError):
        encoder.hash(data.getvalue()[:300])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="0 bytes"):
        encoder.hash(empty)
    with pytest.raises(ImageDecodeError):  # one bad image fails the batch, naming the problem
        encoder.hash_images([np.zeros((8, 8, 3), np.uint8), b"not an image"])
    with pytest.raises(UnsupportedInputError, match="use hash for a single"):
        encoder.hash_images("one.jpg")
    with pytest.raises(UnsupportedInputError, match="hash_images"):
        encoder.hash(np.zeros((2, 8, 8, 3), np.uint8))


def test_pixel_limit_is_per_encoder(bundle):
    small = Encoder.load(bundle[0], max_image_pixels=1000)
    with pytest.raises(ImageTooLargeError):
        small.hash(np.zeros((40, 40, 3), np.uint8))
    assert small.hash(np.zeros((30, 30, 3), np.uint8)).shape == (4,)


def test_bundle_without_vocabulary_takes_bow_only(tmp_path):
    directory, weights = make_bundle(tmp_path / "b", with_vocabulary=False, modalities=("text",))
    encoder = Encoder.load(directory)
    assert encoder.vocabulary is None and encoder.modalities == ("text",)
    with pytest.raises(TextInputError, match="no vocabulary"):
        encoder.hash_text("cat")
    bow = np.eye(len(WORDS), dtype=np.float32)[:3]
    assert_codes_match(encoder.hash_texts(bow), text_reference(weights, bow))
    with pytest.raises(UnsupportedInputError, match="no image model"):
        encoder.hash(np.zeros((8, 8, 3), np.uint8))


def test_nan_output_is_an_error_not_a_code(tmp_path):
    weights = random_weights(32, len(WORDS))
    weights.text_w[0, 0] = np.nan
    directory, _ = make_bundle(tmp_path / "b", text_model=text_onnx(weights), modalities=("text",))
    encoder = Encoder.load(directory)
    with pytest.raises(CodeFormatError, match="NaN"):
        encoder.hash_text("beach")


def test_sign_output_refuses_return_continuous(tmp_path):
    directory, _ = make_bundle(tmp_path / "b", modalities=("text",))
    manifest_path = directory / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"values": "tanh"', '"values": "sign"'))
    encoder = Encoder.load(directory)
    assert encoder.hash_text("cat").shape == (4,)
    with pytest.raises(UnsupportedInputError, match="outputs signs"):
        encoder.hash_text("cat", return_continuous=True)


# --- models that do not match the manifest -----------------------------------------------------


@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda w: image_onnx(w, SIZE, input_name="images"), "named 'images'"),
        (lambda w: image_onnx(w, SIZE, batch=1), "batch axis is fixed"),
        (lambda w: image_onnx(w, 64), "axis 2 is 64"),
        (lambda w: image_onnx(w, SIZE, output_name="embedding"), "no output 'codes'"),
        (lambda w: image_onnx(random_weights(16, len(WORDS)), SIZE), "16 values per item"),
    ],
)
def test_image_model_not_matching_the_manifest(tmp_path, make_model, message):
    weights = random_weights(32, len(WORDS))
    directory, _ = make_bundle(tmp_path / "b", image_model=make_model(weights), modalities=("image",))
    with pytest.raises(ModelSignatureError, match=message):
        Encoder.load(directory)


def test_text_model_of_the_wrong_dtype_or_no_model_at_all(tmp_path):
    from onnx import TensorProto

    weights = random_weights(32, len(WORDS))
    weights.text_w = weights.text_w.astype(np.float16)
    weights.text_b = weights.text_b.astype(np.float16)
    directory, _ = make_bundle(tmp_path / "a", text_model=text_onnx(weights, dtype=TensorProto.FLOAT16), modalities=("text",))
    with pytest.raises(ModelSignatureError, match="tensor\\(float16\\)"):
        Encoder.load(directory)
    directory, _ = make_bundle(tmp_path / "b", text_model=b"this is not onnx", modalities=("text",))
    with pytest.raises(BundleError, match="not a model onnxruntime can load"):
        Encoder.load(directory)


def test_tampered_bundle_fails_before_any_model_runs(bundle, tmp_path):
    import shutil

    copy = Path(shutil.copytree(bundle[0], tmp_path / "copy"))
    data = bytearray((copy / "image.onnx").read_bytes())
    data[-5] ^= 1
    (copy / "image.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="image.onnx fails its checksum"):
        Encoder.load(copy)


def test_loads_from_the_archive(bundle, encoder, tmp_path):
    from cmhash.bundle import pack_archive

    archive = pack_archive(bundle[0], tmp_path / "bundle.zip")
    from_zip = Encoder.load(archive)
    image = np.random.default_rng(5).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert np.array_equal(from_zip.hash(image), encoder.hash(image))
    assert from_zip.bits == 32 and from_zip.label_names == ["animals", "sky"] and from_zip.method == "tiny"


# --- backends ------------------------------------------------------------------------------


def test_backend_and_device_choices(bundle):
    auto = Encoder.load(bundle[0])
    assert auto.backend == "onnxruntime" or tensorrt_available()[0]
    assert "onnxruntime" in repr(Encoder.load(bundle[0], backend="onnxruntime", threads=2))
    with pytest.raises(ValueError, match="unknown backend"):
        Encoder.load(bundle[0], backend="openvino")
    with pytest.raises(ValueError, match="unknown device"):
        Encoder.load(bundle[0], device="tpu")
    with pytest.raises(ValueError, match="threads"):
        Encoder.load(bundle[0], threads=0)
    with pytest.raises(TypeError, match="no options"):
        Encoder.load(bundle[0], backend="onnxruntime", precision="fp16")


def test_cuda_without_a_gpu_is_a_clear_error(bundle):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        Encoder.load(bundle[0], backend="onnxruntime", device="cuda")
    assert Encoder.load(bundle[0], device="auto").backends["image"].device == "cpu"


def test_tensorrt_absent_is_a_clear_error(bundle):
    available, reason = tensorrt_available()
    if available:
        pytest.skip("TensorRT and a GPU are present")
    assert reason
    with pytest.raises(BackendUnavailableError, match="cannot run here"):
        Encoder.load(bundle[0], backend="tensorrt", device="cuda")
    with pytest.raises(BackendUnavailableError, match="GPU"):
        Encoder.load(bundle[0], backend="tensorrt", device="cpu")


@pytest.mark.skipif(not tensorrt_available()[0], reason="needs TensorRT and a GPU")
def test_tensorrt_matches_onnxruntime(bundle, tmp_path):
    trt = Encoder.load(bundle[0], backend="tensorrt", device="cuda", cache_dir=tmp_path)
    ort = Encoder.load(bundle[0], backend="onnxruntime")
    images = photos_or_generated(40)
    assert np.abs(trt.hash_images(images, return_continuous=True) - ort.hash_images(images, return_continuous=True)).max() < 1e-4
    assert len(list(tmp_path.glob("*.plan"))) == 2  # cached
    again = Encoder.load(bundle[0], backend="tensorrt", device="cuda", cache_dir=tmp_path)
    assert np.array_equal(again.hash_texts(["cat"]), trt.hash_texts(["cat"]))


def test_tensorrt_precision_policy_per_major_version():
    assert builder_settings(10, "fp32") == {"flags": [], "strongly_typed": False}
    assert builder_settings(10, "fp16") == {"flags": ["FP16"], "strongly_typed": False}
    assert builder_settings(10, "model") == {"flags": [], "strongly_typed": True}
    assert builder_settings(11, "fp32") == {"flags": [], "strongly_typed": True}
    with pytest.raises(ValueError, match="TensorRT 11 removed the FP16 builder flag"):
        builder_settings(11, "fp16")
    with pytest.raises(BackendUnavailableError, match="too old"):
        builder_settings(8, "fp32")
    with pytest.raises(ValueError, match="precision"):
        builder_settings(10, "int8")


def test_tensorrt_cache_key_covers_everything_an_engine_depends_on():
    base = dict(model_sha256="a" * 64, gpu="H100 sm_90", trt_version="10.3.0", precision="fp32",
                input_shape=("batch", 3, 224, 224), max_batch=64)
    keys = {cache_key(**base)}
    for field, other in [("model_sha256", "b" * 64), ("gpu", "A100 sm_80"), ("trt_version", "10.4.0"),
                         ("precision", "fp16"), ("input_shape", ("batch", 3, 256, 256)), ("max_batch", 32)]:
        keys.add(cache_key(**{**base, field: other}))
    assert len(keys) == 7 and cache_key(**base) == cache_key(**base)


# --- the backend registry ----------------------------------------------------------------------


def test_the_registry_declares_what_each_backend_runs():
    assert list(REGISTRY) == ["tensorrt", "onnxruntime"] and BACKENDS == ("auto", "tensorrt", "onnxruntime")
    assert backends_for("int8-dynamic") == ["onnxruntime"]  # com.microsoft ops: TensorRT does not read them
    assert backends_for("int8", "cpu") == ["onnxruntime"] and backends_for("fp16", "cuda:1") == ["tensorrt", "onnxruntime"]
    assert REGISTRY["onnxruntime"].available("cpu")[0]
    trt_ok, trt_reason = REGISTRY["tensorrt"].available("cuda")
    assert trt_ok or "pip install" in trt_reason or "GPU" in trt_reason
    assert backends_for(available=True) == (["tensorrt"] if trt_ok else []) + ["onnxruntime"]
    assert default_device("tensorrt", "cpu") == "cuda" and default_device("onnxruntime", "cpu") == "cpu"
    assert not REGISTRY["tensorrt"].exact_fp32 and REGISTRY["onnxruntime"].exact_fp32
    with pytest.raises(ValueError, match="choose one of auto, tensorrt, onnxruntime"):
        backend_class("openvino")


class NumpyBackend(Backend):
    """A backend written in one class, as a new backend file would be: it evaluates the
    fixture towers (Conv -> ReLU -> mean -> Gemm -> tanh, or Gemm -> tanh) from the
    model's own ONNX weights in numpy, fp32 only."""

    name = "numpy"
    devices = ("cpu",)
    variants = ("fp32",)

    @classmethod
    def available(cls, device="cpu"):
        return True, f"numpy {np.__version__}"

    @classmethod
    def create(cls, model, spec, *, device, device_index, threads, variant, **options):
        return cls(model, spec)

    def __init__(self, model, spec):
        import onnx
        from onnx import numpy_helper

        self.spec = spec
        self.weights = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(model).graph.initializer}

    def run(self, batch):
        w = self.weights
        if "conv_w" in w:
            from fixtures.towers import Weights

            weights = Weights(w["conv_w"], w["conv_b"], w["image_w"], w["image_b"], None, None)
            return image_reference(weights, batch).astype(np.float32)
        return np.tanh(batch @ w["text_w"].T + w["text_b"]).astype(np.float32)


def test_a_backend_is_one_class_and_one_registry_entry(bundle, encoder, monkeypatch):
    monkeypatch.setitem(REGISTRY, "numpy", NumpyBackend)
    images = photos_or_generated(6)
    with Encoder.load(bundle[0], backend="numpy") as enc:
        assert enc.backend == "numpy"
        assert bit_share(enc.hash_images(images), encoder.hash_images(images)) >= 0.99
        assert np.array_equal(enc.hash_texts(["a cat", "the sea"]), encoder.hash_texts(["a cat", "the sea"]))
    assert backends_for("fp32", "cpu") == ["onnxruntime", "numpy"] and backends_for("int8") == ["tensorrt", "onnxruntime"]
    with pytest.raises(BackendUnavailableError, match="the fp16 variant does not run on numpy"):
        create_backend("numpy", b"", None, variant="fp16")
    with pytest.raises(BackendUnavailableError, match="runs on the CPU"):
        create_backend("numpy", b"", None, device="cuda")
    with pytest.raises(TypeError, match="numpy takes no options"):
        create_backend("numpy", b"", None, cache_dir="x")


def bit_share(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.unpackbits(a, axis=1) == np.unpackbits(b, axis=1)).mean())


# --- checking a bundle on this machine ------------------------------------------------------------


def with_reference(source: Path, target: Path, weights, *, flip_text: bool = False) -> Path:
    """``source`` rewritten with reference sets whose outputs are the numpy towers' (the
    text codes flipped when asked: a reference the models cannot reproduce)."""
    from cmhash.bundle import load_bundle, write_bundle
    from cmhash.reference import Contract, reference_file

    loaded = load_bundle(source)
    rng = np.random.default_rng(7)
    pixels = ImagePreprocessor(image_size=SIZE)(photos_or_generated(8))
    bow = (rng.random((8, len(WORDS))) < 0.3).astype(np.uint8)
    text_out = text_reference(weights, bow)
    files = dict(loaded.files)
    files["reference/image.npz"] = reference_file(pixels, image_reference(weights, pixels))
    files["reference/text.npz"] = reference_file(bow, -text_out if flip_text else text_out)
    manifest = {k: v for k, v in loaded.manifest.items() if k not in ("files", "format_version")}
    manifest["reference"] = {"contract": Contract().to_dict(), "modalities": {
        "image": {"file": "reference/image.npz", "items": 8}, "text": {"file": "reference/text.npz", "items": 8}}}
    return write_bundle(target, manifest, files)


def test_a_bundle_with_reference_data_checks_itself(bundle, tmp_path, capsys):
    from cmhash.cli import main

    checked = with_reference(bundle[0], tmp_path / "checked", bundle[1])
    enc = Encoder.load(checked, threads=1, verify=True)
    assert enc.verification["passed"] and {r["modality"] for r in enc.verification["results"]} == {"image", "text"}
    assert main(["verify", str(checked), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"] == {"fp32": True}

    script = ("import sys; from cmhash.cli import main; rc = main(['verify', sys.argv[1]]); "
              "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", script, str(checked)], capture_output=True, text=True)
    assert out.returncode == 0 and "fp32: passes here" in out.stdout, out.stderr  # the runtime alone

    flipped = with_reference(bundle[0], tmp_path / "flipped", bundle[1], flip_text=True)
    with pytest.raises(ReferenceCheckError, match="text fp32 on onnxruntime: 0.00% of bits.*no variant of this bundle"):
        Encoder.load(flipped, threads=1, verify=True)
    assert main(["verify", str(flipped)]) == 1
    assert "fp32: FAILS here; variants that pass: none" in capsys.readouterr().out


def test_a_bundle_without_reference_data_says_it_cannot_check(bundle, capsys):
    from cmhash.cli import main

    with pytest.warns(UserWarning, match="cannot check: .* carries no reference inputs and codes"):
        enc = Encoder.load(bundle[0], verify=True)
    assert enc.verification == {"checkable": False, "reason": enc.verification["reason"]}
    assert enc.hash_text("a cat").shape == (4,)  # loaded all the same
    assert main(["verify", str(bundle[0])]) == 3
    assert "cannot check" in capsys.readouterr().err and "re-export" in enc.verification["reason"]


# --- light imports ----------------------------------------------------------------------------

HASH_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    import cmhash
    from cmhash.encoder import Encoder
    enc = Encoder.load(sys.argv[1])
    code = enc.hash(np.zeros((40, 50, 3), np.uint8))
    text = enc.hash_text("a cat on the beach")
    assert code.shape == text.shape == (enc.bits // 8,), (code.shape, text.shape)
    assert "torch" not in sys.modules, "torch was imported"
    print("ok", cmhash.__file__)
    """
)


def test_hashing_never_imports_torch(bundle):
    out = subprocess.run([sys.executable, "-c", HASH_SCRIPT, str(bundle[0])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_import_cmhash_loads_no_inference_runtime():
    """onnxruntime loads only when an Encoder is made; torch never."""
    script = "import sys, cmhash, cmhash.encoder; print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_fresh_venv_with_plain_pip_install_hashes_without_torch(bundle, plain_wheel_python, tmp_path):
    """Only `pip install <wheel>` (no extras): its dependencies must be enough to hash."""
    out = subprocess.run([plain_wheel_python, "-c", HASH_SCRIPT, str(bundle[0])], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, (
        f"{out.stderr}\n(a plain install must bring numpy, Pillow and onnxruntime and ship cmhash.backends: "
        "check [project].dependencies and [tool.setuptools].packages)"
    )
    assert str(plain_wheel_python.parents[1]) in out.stdout  # the installed package, not the source tree
