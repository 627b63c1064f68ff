"""Export of trained towers to ONNX bundles, with fp16/int8 variants, TensorRT engines and
verification against PyTorch (needs the ``export`` extra: torch, onnx).

    from cmhash.export import export_checkpoint
    report = export_checkpoint("runs/egath/best", "bundle/", int8=True, verify_data="photos/")
"""

from cmhash.errors import ExportError, VerificationError

from .api import DEFAULT_BIT_FLOOR, export_checkpoint, keep_passing
from .loading import Trained, load_trained
from .onnx_export import OPSET, export_tower
from .variants import float_nodes, quantize_int8, quantize_int8_dynamic, to_fp16

__all__ = [
    "export_checkpoint",
    "keep_passing",
    "load_trained",
    "Trained",
    "export_tower",
    "to_fp16",
    "quantize_int8",
    "quantize_int8_dynamic",
    "float_nodes",
    "ExportError",
    "VerificationError",
    "DEFAULT_BIT_FLOOR",
    "OPSET",
]
