"""Encoding on Spark in ``local[2]`` mode (a real JVM and Python workers, started once for
the module): ``spark_hasher`` with ``mapInPandas`` on the ``binaryFile`` source of real
photos and on a text column gives the codes of :class:`~cmhash.encoder.Encoder`; bad items
get a reason and a null code, never a failed job."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

pyspark = pytest.importorskip("pyspark", reason="the spark extra is not installed")
pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
pytest.importorskip("onnx", reason="the tests build their ONNX towers with the onnx package")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs Java (none found)", allow_module_level=True)

from cmhash.encoder import Encoder  # noqa: E402
from cmhash.scale import spark_code_schema, spark_hasher  # noqa: E402

from fixtures.data import DATA  # noqa: E402
from fixtures.towers import make_bundle  # noqa: E402

PHOTOS = sorted((DATA / "mirflickr-mini" / "images").glob("*.jpg"))[:10]


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers run this interpreter, which has cmhash
    session = (SparkSession.builder.master("local[2]").appName("cmhash-test")
               .config("spark.driver.memory", "1g").config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "2").config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", bits=64, image_size=32)[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """10 images (real photos where present) and one that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(10):
        image = Image.open(PHOTOS[i]).convert("RGB") if PHOTOS else Image.fromarray(
            np.random.default_rng(i).integers(0, 256, (40 + i, 50, 3), dtype=np.uint8))
        image.save(root / f"img{i:02d}.jpg")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    return root


def test_binary_files_hash_to_the_encoders_codes(spark, bundle, photos):
    df = spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg").load(str(photos)).repartition(2)
    out = df.mapInPandas(spark_hasher(str(bundle), column="content"), schema=spark_code_schema(df.schema, "content"))
    assert [f.name for f in out.schema.fields] == ["path", "modificationTime", "length", "code", "reason"]
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in out.collect()}
    assert len(rows) == 11
    bad = rows.pop("broken.jpg")
    assert bad["code"] is None and bad["reason"].startswith("ImageDecodeError")
    names = sorted(rows)
    expected = Encoder.load(bundle).hash_images([photos / n for n in names])
    assert [bytes(rows[n]["code"]) for n in names] == [c.tobytes() for c in expected]
    assert all(rows[n]["reason"] is None for n in names)


def test_text_column(spark, bundle):
    texts = ["a cat on a sofa", "dog and sky", "zzzz qqqq", None, "the sky"]
    df = spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "id long, text string").repartition(2)
    out = df.mapInPandas(spark_hasher(str(bundle), column="text", modality="text"),
                         schema=spark_code_schema(df.schema, "text"))
    rows = {r["id"]: r for r in out.collect()}
    expected = Encoder.load(bundle).hash_texts([texts[i] for i in (0, 1, 4)])
    assert [bytes(rows[i]["code"]) for i in (0, 1, 4)] == [c.tobytes() for c in expected]
    assert rows[2]["code"] is None and "vocabulary" in rows[2]["reason"]
    assert rows[3]["code"] is None and "missing" in rows[3]["reason"]
