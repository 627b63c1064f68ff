"""Malformed MATLAB files (label embeddings, the papers' data layout) are DataErrors that
name the file, not raw ValueError/TypeError from scipy or numpy."""

import numpy as np
import pytest

pytest.importorskip("torch_geometric", reason="the train extra")
scipy_io = pytest.importorskip("scipy.io")

from cmhash.errors import CmhashError  # noqa: E402
from cmhash.training.blocks.gat import LabelEmbeddings  # noqa: E402
from cmhash.training.data.sources import read_mat_variable  # noqa: E402
from cmhash.training.errors import DataError  # noqa: E402


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "glove.mat"
    scipy_io.savemat(path, {"emb": np.random.default_rng(0).standard_normal((4, 6))})
    return path


def damaged(tmp_path, good):
    data = good.read_bytes()
    cases = {"truncated.mat": data[: len(data) // 2], "header_only.mat": data[:128], "random.mat": bytes(range(256)) * 4,
             "text.mat": b"this is not a MATLAB file\n", "empty.mat": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    scipy_io.savemat(tmp_path / "strings.mat", {"emb": np.array(["a", "b", "c", "d"])})
    scipy_io.savemat(tmp_path / "other_key.mat", {"vectors": np.zeros((4, 6))})
    return [tmp_path / name for name in cases] + [tmp_path / "strings.mat", tmp_path / "other_key.mat"]


def test_good_embeddings_load(good):
    assert LabelEmbeddings(4, glove_path=good)().shape == (4, 6)


def test_damaged_label_embedding_files_are_data_errors(tmp_path, good):
    for path in damaged(tmp_path, good):
        with pytest.raises(DataError, match=path.name) as info:
            LabelEmbeddings(4, glove_path=path)
        assert isinstance(info.value, CmhashError)


def test_damaged_data_files_are_data_errors(tmp_path, good):
    for path in damaged(tmp_path, good)[:5]:
        with pytest.raises(DataError, match=path.name):
            read_mat_variable(path, "emb")
