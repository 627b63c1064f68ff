"""Hostile bundles: every one ends in a BundleError subclass that says what is wrong, before
any unlisted member is read and without reading files from outside the bundle."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cmhash
from cmhash import limits
from cmhash.bundle import MANIFEST_NAME, load_bundle, pack_archive
from cmhash.errors import BundleError, BundlePermissionError, BundleTooLargeError, ResourceLimitError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from fixtures.towers import make_bundle, random_weights, text_onnx  # noqa: E402


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle", modalities=("text",))[0]


def rezip(bundle, path, compression=zipfile.ZIP_DEFLATED, extra=()):
    """The bundle folder as a zip written by a plain zip tool, plus ``extra`` (name, bytes)."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for file in sorted(bundle.iterdir()):
            zf.write(file, file.name)
        for name, data in extra:
            zf.writestr(name, data)
    return path


def patch_headers(path, name, local_offset, central_offset, fmt, value):
    """Overwrite one field of member ``name`` in both its local header and its central
    directory entry (zipfile itself will not write encrypted or exotic members)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    struct.pack_into(fmt, data, local + local_offset, value)
    central = data.index(b"PK\x01\x02" + bytes(24) [:0])  # the first central entry
    while True:
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46: central + 46 + name_len] == name.encode():
            struct.pack_into(fmt, data, central + central_offset, value)
            break
        extra_len, comment_len = struct.unpack_from("<HH", data, central + 30)
        central += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))
    return path


def test_a_plain_deflated_zip_of_a_bundle_loads(bundle, tmp_path):
    loaded = load_bundle(rezip(bundle, tmp_path / "b.zip"))
    assert dict(loaded.files) == dict(load_bundle(bundle).files)


def test_an_unlisted_member_is_refused_without_being_read(bundle, tmp_path):
    bomb = rezip(bundle, tmp_path / "bomb.zip", extra=[("big.bin", bytes(256 << 20))])
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="not listed in the manifest: big.bin"):
            load_bundle(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse an unlisted member"


def test_files_over_the_size_limit_are_refused_before_reading(bundle, tmp_path, monkeypatch):
    archive = pack_archive(bundle)
    monkeypatch.setattr(limits, "MAX_BUNDLE_BYTES", 100)
    for source in (bundle, archive):
        with pytest.raises(BundleTooLargeError, match="MAX_BUNDLE_BYTES") as info:
            load_bundle(source)
        assert isinstance(info.value, ResourceLimitError)


def test_a_member_longer_than_its_header_says_is_refused(bundle, tmp_path):
    archive = rezip(bundle, tmp_path / "b.zip", compression=zipfile.ZIP_STORED)
    with zipfile.ZipFile(archive) as zf:
        size = zf.getinfo("text.onnx").file_size
    # uncompressed size: local header offset 22, central entry offset 24
    patch_headers(archive, "text.onnx", 22, 24, "<I", size - 10)
    with pytest.raises(BundleError):
        load_bundle(archive)


def test_an_encrypted_member_is_a_bundle_error(bundle, tmp_path):
    archive = patch_headers(rezip(bundle, tmp_path / "b.zip"), "text.onnx", 6, 8, "<H", 0x1)
    with pytest.raises(BundleError, match="text.onnx is encrypted"):
        load_bundle(archive)


def test_an_unknown_compression_method_is_a_bundle_error(bundle, tmp_path):
    archive = patch_headers(rezip(bundle, tmp_path / "b.zip"), "text.onnx", 8, 10, "<H", 99)
    with pytest.raises(BundleError, match="compression method 99"):
        load_bundle(archive)


def test_corrupt_deflate_data_is_a_bundle_error(bundle, tmp_path):
    archive = rezip(bundle, tmp_path / "b.zip")
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("text.onnx")
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename)
    data[start: start + 64] = bytes(range(200, 255)) + bytes(9)  # garbage where deflate blocks were
    archive.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt|checksum|size"):
        load_bundle(archive)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_a_deeply_nested_manifest_is_a_bundle_error(bundle, text):
    (bundle / MANIFEST_NAME).write_text(text)
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(bundle)


def test_an_oversized_manifest_is_refused(bundle):
    (bundle / MANIFEST_NAME).write_text(" " * (17 << 20) + "{}")
    with pytest.raises(BundleError, match="a manifest is at most"):
        load_bundle(bundle)


def test_fifo_in_a_bundle_folder_is_refused_without_blocking(bundle):
    os.mkfifo(bundle / "pipe")
    with pytest.raises(BundleError, match="pipe is not a regular file"):
        load_bundle(bundle)


# --- permissions -------------------------------------------------------------------------------

LOAD = "import sys, cmhash.bundle as b\ntry:\n    b.load_bundle(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"


def load_without_read_override(path) -> str:
    """Load ``path`` in a subprocess that obeys file modes (root without CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a process that file modes apply to")
    drop = "-dac_override,-dac_read_search"
    result = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", LOAD,
                             str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_permission_errors_are_reported_as_such(bundle):
    assert load_without_read_override(bundle) == ""  # owned by this user: loads
    os.chown(bundle / "text.onnx", 65534, 65534)
    (bundle / "text.onnx").chmod(0o600)
    out = load_without_read_override(bundle)
    assert out.startswith("BundlePermissionError") and "permission denied" in out and "text.onnx" in out
    os.chown(bundle, 65534, 65534)
    bundle.chmod(0o700)
    out = load_without_read_override(bundle)
    assert out.startswith("BundlePermissionError") and "no manifest" not in out
    assert issubclass(BundlePermissionError, PermissionError)


# --- ONNX external data ---------------------------------------------------------------------------


def external_data_model(folder: Path) -> bytes:
    """A real text tower saved with its weights in ``W.bin``, a bare file name."""
    import onnx  # the export extra
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load_from_string(text_onnx(random_weights(32, 5)))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="W.bin", size_threshold=0)
    onnx.save_model(model, folder / "model.onnx")
    assert (folder / "W.bin").exists()
    return (folder / "model.onnx").read_bytes()


def test_a_model_reading_external_data_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    outside = tmp_path / "cwd"
    outside.mkdir()
    model = external_data_model(outside)
    monkeypatch.chdir(outside)
    ort.InferenceSession(model, providers=["CPUExecutionProvider"])  # the threat: it loads W.bin from the cwd
    path, _ = make_bundle(tmp_path / "bundle", modalities=("text",), with_vocabulary=False, text_model=model)
    with pytest.raises(BundleError, match="external data"):
        cmhash.Encoder.load(path)


def test_self_contained_models_pass_the_external_data_check(tmp_path):
    path, _ = make_bundle(tmp_path / "bundle")
    encoder = cmhash.Encoder.load(path)
    assert encoder.hash_texts(np.ones((1, encoder.text_dim), np.float32)).shape == (1, 4)


def test_a_fifo_given_as_the_bundle_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "bundle.zip")
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(tmp_path / "bundle.zip")


def test_an_unknown_variant_is_an_invalid_argument(bundle):
    from cmhash.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="unknown variant 'int4'"):
        load_bundle(bundle).model_file("text", "int4")
