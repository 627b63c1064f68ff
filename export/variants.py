"""Reduced-precision variants of an exported tower, and TensorRT engines built from them.

- **fp16**: weights and arithmetic in float16 (onnxruntime's converter), input and output
  kept float32 so a variant is a drop-in replacement (casts at both ends); LayerNormalization
  stays float32.
- **int8**: static QDQ quantisation (onnxruntime ``quantize_static``) of the MatMul, Gemm
  and Conv nodes, calibrated on real inputs. Activations and weights are symmetric int8 (zero point 0: what TensorRT's
  explicit quantisation accepts), weights per channel. Kept in float, because int8 there is
  what ruins transformer embeddings: every LayerNormalization, Softmax and GELU (``Erf``
  pattern or ``Gelu``) with its direct neighbours and the other readers of its inputs (a
  tensor is quantised once for all readers; this keeps residual Adds float), and the hash head (the last
  MatMul/Gemm before each output and everything after it: the tanh decides the bits).
- **int8-dynamic** (onnxruntime on CPU only): the graph fused by onnxruntime's transformer
  optimiser (``Attention``, ``SkipLayerNormalization``, ``BiasGelu``: com.microsoft ops),
  then dynamic quantisation (``quantize_dynamic``: int8 per-channel weights, activations
  quantised per call by ``DynamicQuantizeLinear``, ``MatMulInteger``/``QAttention``). No
  calibration. The hash head stays float. TensorRT reads neither the com.microsoft ops nor
  dynamic quantisation; the QDQ ``int8`` is the one for TensorRT.
- **7-bit weights** (``reduce_range``) in both int8 variants, so that they give the same bits
  on every CPU. onnxruntime runs an int8 product as unsigned activations x signed weights.
  Without VNNI (AVX2, AVX-512 before Cascade Lake) its x86 kernels multiply with
  ``VPMADDUBSW``, which adds two u8 x s8 products into a saturating 16-bit lane:
  255 x 127 x 2 overflows it, and the tower's outputs drift (measured under an emulated
  Haswell: 76-94 % of bits agreeing instead of 99+ %). With weights in [-64, 64] the pair
  sum stays below 2^15, so no lane saturates; VNNI and ARM64 kernels accumulate in 32 bits
  and are unaffected. The cost is one bit of weight precision, which the verification
  below measures like every other loss.
- **TensorRT**: engines built on this GPU from the ONNX files and cached per (model, GPU,
  TensorRT version, precision, profile) by :mod:`cmhash.backends.tensorrt_backend`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from cmhash.errors import ExportError

from .onnx_export import check_model, name_nodes

FLOAT_ANCHORS = ("LayerNormalization", "Softmax", "Gelu")
GELU_CHAIN = ("Add", "Mul", "Div")
HEAD_TAIL = ("Tanh", "Add", "Identity", "Cast", "Mul", "Sign")
# Only the ops with weights are quantised: int8 pays off in their GEMMs; Q/DQ around Adds,
# Muls and pooling only adds conversions (measured: more bits agree, no slower).
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


# --- fp16 ----------------------------------------------------------------------------------------


def to_fp16(model_bytes: bytes, what: str) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # LayerNormalization stays float32: its variance overflows float16 easily, and an fp16
    # LayerNormalization crashes onnxruntime's CPU graph optimiser (seen with onnxruntime 1.32).
    model = convert_float_to_float16(onnx.load_from_string(model_bytes), keep_io_types=True,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "LayerNormalization"])
    _topological_sort(model.graph)  # the converter appends the input casts at the end
    check_model(model, f"{what} (fp16)")
    return name_nodes(model).SerializeToString()


def _topological_sort(graph) -> None:
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in known for i in n.input)]
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ExportError(f"the graph has a cycle or a dangling input near {rest[0].name}")
        for node in ready:
            ordered.append(node)
            known.update(node.output)
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


# --- int8 ----------------------------------------------------------------------------------------


def _graph_index(model) -> tuple[list, dict, dict[str, list]]:
    """The graph's nodes, the node producing each tensor and the nodes reading each tensor."""
    nodes = list(model.graph.node)
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return nodes, producer, consumers


def _computed_inputs(node, producer: dict) -> list:
    """The nodes that compute ``node``'s inputs (graph inputs, weights and constants left out)."""
    return [producer[i] for i in node.input if i in producer and producer[i].op_type != "Constant"]


def float_nodes(model) -> list[str]:
    """Names of the nodes int8 quantisation must leave in float (see the module docstring)."""
    nodes, producer, consumers = _graph_index(model)

    def ups(node):
        return _computed_inputs(node, producer)

    def downs(node):
        return [c for out in node.output for c in consumers.get(out, [])]

    def siblings(node):
        # A tensor is quantised once for all its readers: when any other reader of a kept
        # node's input were quantised, the kept node would read the int8 copy too.
        return [c for i in node.input for c in consumers.get(i, [])]

    keep: set[str] = set()
    for node in nodes:
        if node.op_type in FLOAT_ANCHORS:
            keep.update(n.name for n in [node, *ups(node), *downs(node), *siblings(node)])
        elif node.op_type == "Erf":  # GELU as exported at opset < 20: x * 0.5 * (1 + erf(x / sqrt 2))
            keep.add(node.name)
            keep.update(n.name for up in ups(node) for n in [up, *siblings(up)])
            frontier = downs(node)
            for _ in range(3):
                frontier = [n for n in frontier if n.op_type in GELU_CHAIN]
                keep.update(n.name for n in frontier)
                frontier = [d for n in frontier for d in downs(n)]
    # Matrix products int8 cannot speed up: a Gemm whose bias is computed (the TorchScript export
    # of nn.MultiheadAttention makes those) has no fused int8 kernel, and a product of two
    # activations (attention scores) has no constant weight; quantising them only adds conversions.
    constants = {t.name for t in model.graph.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    for node in nodes:
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
            keep.add(node.name)
        elif node.op_type in ("MatMul", "Gemm") and not any(i in constants for i in node.input[:2]):
            keep.add(node.name)
    keep.update(head_nodes(model))
    return sorted(keep)


def head_nodes(model) -> set[str]:
    """The hash head: from each output back through the tail ops to the last MatMul/Gemm
    (and the other readers of its input)."""
    _, producer, consumers = _graph_index(model)
    keep: set[str] = set()
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in HEAD_TAIL:
            keep.add(node.name)
            inputs = _computed_inputs(node, producer)
            node = inputs[0] if len(inputs) == 1 else next((n for n in inputs if n.op_type in ("MatMul", "Gemm")), None)
        if node is not None and node.op_type in ("MatMul", "Gemm"):
            keep.update(n.name for n in [node, *(c for i in node.input for c in consumers.get(i, []))])
    return keep


class _ArrayReader:
    """onnxruntime's CalibrationDataReader protocol over float32 batches."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name = input_name
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self):  # not needed for MinMax, part of the protocol
        pass


def quantize_int8(model_bytes: bytes, input_name: str, calibration: np.ndarray, what: str, batch_size: int = 16) -> tuple[bytes, dict]:
    """Static QDQ int8 quantisation calibrated on ``calibration`` (real preprocessed inputs).

    Returns the model bytes and what was done (excluded nodes, calibration items).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if len(calibration) == 0:
        raise ExportError(f"int8 quantisation of the {what} tower needs real calibration inputs; none were given")
    model = onnx.load_from_string(model_bytes)
    exclude = float_nodes(model)
    batches = [calibration[i : i + batch_size] for i in range(0, len(calibration), batch_size)]
    with tempfile.TemporaryDirectory(prefix="cmhash-int8-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        src.write_bytes(model_bytes)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger about every skipped node
        try:
            quantize_static(
                str(src),
                str(dst),
                _ArrayReader(input_name, batches),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,  # 7-bit weights: see the module docstring
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=exclude,
                op_types_to_quantize=list(QUANTIZED_OPS),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        except Exception as exc:
            raise ExportError(f"int8 quantisation of the {what} tower failed: {exc}") from exc
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(dst))
    check_model(quantized, f"{what} (int8)")
    n_q = sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    info = {"calibration_items": int(len(calibration)), "float_nodes": len(exclude), "quantize_nodes": n_q,
            "format": "QDQ", "activations": "int8 symmetric", "weights": "7-bit symmetric per channel (in int8)"}
    return name_nodes(quantized).SerializeToString(), info


# --- int8-dynamic (onnxruntime CPU) --------------------------------------------------------------


def fuse_transformer(model_bytes: bytes, what: str):
    """onnxruntime's transformer fusions (attention, skip LayerNorm, bias GELU) applied
    offline; head counts are read from the graph's reshapes. A graph without attention
    (a CNN, an MLP) comes back with whatever else fused."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the optimiser logs every pattern it does not find
    try:
        with tempfile.TemporaryDirectory(prefix="cmhash-fuse-") as tmp:
            src = Path(tmp) / "model.onnx"
            src.write_bytes(model_bytes)
            # opt_level 0: the Python fusions only; onnxruntime's own passes run at load time.
            fused = optimize_model(str(src), model_type="clip", num_heads=0, hidden_size=0, opt_level=0)
    except Exception as exc:
        raise ExportError(f"onnxruntime's transformer optimiser failed on the {what} tower: {exc}") from exc
    finally:
        root.setLevel(level)
    model = fused.model
    _topological_sort(model.graph)
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"} - {o.domain for o in model.opset_import}
    model.opset_import.extend(onnx.helper.make_opsetid(d, 1) for d in sorted(domains))  # the optimiser leaves them out
    onnx.checker.check_model(model)  # com.microsoft ops: the full check knows no schemas for them
    return model, fused.get_fused_operator_statistics()


def quantize_int8_dynamic(model_bytes: bytes, what: str) -> tuple[bytes, dict]:
    """The fused graph with int8 per-channel weights and per-call activation quantisation,
    for onnxruntime on CPU (see the module docstring). Returns the bytes and what was done."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, fused = fuse_transformer(model_bytes, what)
    name_nodes(model)
    head = head_nodes(model)
    # Dynamic quantisation first splits each Gemm into "<name>_MatMul" + Add and then matches
    # the exclusions against the new names (onnxruntime 1.32): exclude both.
    gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
    exclude = sorted(head | {f"{name}_MatMul" for name in head & gemms})
    with tempfile.TemporaryDirectory(prefix="cmhash-int8d-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8d.onnx"
        onnx.save(model, str(src))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True,  # 7-bit weights: see the module docstring
                             op_types_to_quantize=["MatMul", "Gemm", "Attention"], nodes_to_exclude=exclude,
                             # com.microsoft ops have no shape inference in onnx: their outputs are float
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as exc:
            raise ExportError(f"dynamic int8 quantisation of the {what} tower failed: {exc}") from exc
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(dst))
    onnx.checker.check_model(quantized)
    counts = {op: sum(1 for n in quantized.graph.node if n.op_type == op)
              for op in ("QAttention", "MatMulInteger", "DynamicQuantizeMatMul")}
    info = {"format": "dynamic (onnxruntime CPU only)", "weights": "7-bit symmetric per channel (in int8)",
            "activations": "uint8, quantised per call", "fused": {k: v for k, v in fused.items() if v},
            "quantized": {k: v for k, v in counts.items() if v}, "float_nodes": len(head)}
    return name_nodes(quantized).SerializeToString(), info
