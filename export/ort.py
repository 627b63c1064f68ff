"""ORT-format copies of a bundle's towers (``cmhash export --ort``), for small devices.

onnxruntime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``) loads each
ONNX file, applies the graph optimisations up to a level, and saves the optimised graph in
onnxruntime's flatbuffer format. Two uses:

- a reduced (minimal) onnxruntime build reads only ORT files, and is compiled for the
  operators they use: the converter writes that list (``required_operators.config``,
  passed to onnxruntime's ``build.sh --include_ops_by_config``);
- a full onnxruntime loads the already optimised graph, so a cold start does not redo
  the optimisations.

The level is ``extended`` (:data:`ORT_OPTIMIZATION_LEVEL`), not ``all``: ``all`` adds layout
transforms (NCHWc blocking) chosen for this machine's vector width, which would tie the
file to AVX2 or AVX-512. Extended holds only fusions every CPU runs. onnxruntime does not
optimise an ORT-format graph again at load, so the device runs exactly the stored graph
(without NCHWc blocking, which convolutional towers may miss: ``cmhash bench`` shows it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

from cmhash.errors import ExportError

ORT_OPTIMIZATION_LEVEL = "extended"
OPS_CONFIG = "required_operators.config"


def ort_name(onnx_name: str) -> str:
    """``image.int8.onnx`` -> ``image.int8.ort``."""
    return onnx_name[: -len(".onnx")] + ".ort"


def convert_to_ort(models: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    """ONNX files by bundle name -> (ORT files by bundle name, the required-operators
    configuration for all of them), converted at :data:`ORT_OPTIMIZATION_LEVEL`."""
    import onnxruntime
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    level_key = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"  # the converter reads its level from here
    saved = os.environ.get(level_key)
    os.environ[level_key] = ORT_OPTIMIZATION_LEVEL
    try:
        with tempfile.TemporaryDirectory(prefix="cmhash-ort-") as tmp:
            src, dst = Path(tmp) / "onnx", Path(tmp) / "ort"
            src.mkdir()
            for name, data in models.items():
                (src / name).write_bytes(data)
            quiet = logging.getLogger("ort_format_model.utils")  # and logs where it wrote the config
            with contextlib.redirect_stdout(io.StringIO()) as said, _level(quiet, logging.WARNING):  # prints each step
                try:
                    convert_onnx_models_to_ort(src, dst, optimization_styles=[OptimizationStyle.Fixed])
                except Exception as exc:
                    raise ExportError(f"onnxruntime {onnxruntime.__version__} could not convert the towers to "
                                      f"ORT format: {exc}\n{said.getvalue()[-2000:]}") from exc
            level = "" if ORT_OPTIMIZATION_LEVEL == "all" else f".{ORT_OPTIMIZATION_LEVEL}"  # its file names
            converted = {ort_name(name): (dst / (name[: -len(".onnx")] + level + ".ort")).read_bytes() for name in models}
            config = (dst / f"required_operators{level}.config").read_text()
            # the header names the converted files by their temporary paths: name them as in the bundle
            config = config.replace(str(dst.resolve()) + os.sep, "").replace(f"{level}.ort", ".ort")
    finally:
        if saved is None:
            os.environ.pop(level_key, None)
        else:
            os.environ[level_key] = saved
    return converted, config


@contextlib.contextmanager
def _level(logger: logging.Logger, level: int):
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)
