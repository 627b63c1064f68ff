"""Towers to ONNX: TorchScript exporter, opset 17, dynamic batch axis, checked graphs.

The TorchScript exporter (``dynamo=False``) is used on purpose: it handles the attention
blocks of open_clip towers with a dynamic batch axis, where torch.export still
specialises or fails (nn.MultiheadAttention has no fake-tensor kernel for its fused path).
The fused MHA fast path is switched off while exporting: it is one opaque kernel
(``aten::_native_multi_head_attention``) the exporter cannot translate; the plain ops it
replaces compute the same values.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from cmhash.errors import ExportError

OPSET = 17
OUTPUT_NAME = "codes"
IMAGE_INPUT = "pixel_values"
TEXT_INPUT = "bow"


class _Float32Out(nn.Module):
    """The tower with a float32 output, whatever precision it computes in."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x).float()


@contextlib.contextmanager
def _export_mode(module: nn.Module):
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    modes = [m.training for m in module.modules()]
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        module.eval()
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        for m, mode in zip(module.modules(), modes):
            m.training = mode


def export_tower(tower: nn.Module, example: torch.Tensor, input_name: str, bits: int, what: str) -> bytes:
    """One tower -> ONNX bytes with input ``input_name`` [batch, ...] float32 and output
    ``codes`` [batch, bits] float32, checked by ``onnx.checker``.

    ``example`` is a real batch of at least 2 items: tracing with one item can bake the
    batch size into reshapes.
    """
    import onnx

    if example.shape[0] < 2:
        example = torch.cat([example, example])
    wrapped = _Float32Out(tower)
    buffer = io.BytesIO()
    with _export_mode(wrapped), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        out = wrapped(example)
        if out.shape != (example.shape[0], bits):
            raise ExportError(f"the {what} tower returns shape {tuple(out.shape)} for {example.shape[0]} items, not (N, {bits})")
        try:
            torch.onnx.export(
                wrapped,
                (example,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=[input_name],
                output_names=[OUTPUT_NAME],
                dynamic_axes={input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types for an unsupported op
            raise ExportError(f"the {what} tower does not export to ONNX opset {OPSET}: {exc}") from exc
    data = buffer.getvalue()
    model = onnx.load_from_string(data)
    check_model(model, what)
    return name_nodes(model).SerializeToString()


def check_model(model, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the ONNX graph of the {what} tower fails onnx.checker: {exc}") from exc


def name_nodes(model):
    """Give every node a unique name (quantisation excludes nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model
