"""The export copy of a tower (static-shape attention) and the int8-dynamic variant: the copy
computes what the tower computes, its graph loses the run-time shape arithmetic and fuses
into onnxruntime's Attention, and int8-dynamic quantises everything but the hash head."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("open_clip")

from torch import nn  # noqa: E402

from cmhash.backends import ModelSpec, create_backend  # noqa: E402
from cmhash.errors import BackendUnavailableError  # noqa: E402
from cmhash.export import export_tower, quantize_int8_dynamic  # noqa: E402
from cmhash.export.onnx_export import ClassTokenViT, ExportAttention, export_copy  # noqa: E402
from cmhash.export.variants import fuse_transformer  # noqa: E402
from cmhash.training.blocks.backbones import build_image_backbone  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tower(nn.Module):
    """A tiny CLIP ViT (the same open_clip classes as ViT-B/32) and a hash head."""

    def __init__(self, bits: int = 16):
        super().__init__()
        self.backbone = build_image_backbone("clip:tiny-vit")
        self.head = nn.Linear(self.backbone.output_dim, bits)

    def forward(self, x):
        return torch.tanh(self.head(self.backbone(x)))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    tower = Tower().eval()
    with torch.no_grad():  # a scale that puts the tanh outputs away from 0, like a trained head
        tower.head.weight.mul_(20)
    return tower, torch.randn(6, 3, 64, 64)


@contextlib.contextmanager
def traced_attention():
    """What export traces: nn.MultiheadAttention's plain path (fused fast path off), no
    gradients; the fast-path setting is restored afterwards."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def plain_export(tower, example) -> onnx.ModelProto:
    """The tower exported as is (nn.MultiheadAttention traced directly), for comparison."""
    buffer = io.BytesIO()
    with traced_attention(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tower, (example,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["codes"], dynamic_axes={"x": {0: "batch"}, "codes": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_export_copy_computes_the_same_and_leaves_the_tower_alone(vit):
    tower, x = vit
    copy = export_copy(tower)
    originals = [m for m in tower.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(originals) == 2  # two layers
    assert not any(isinstance(m, ExportAttention) for m in tower.modules())
    replaced = [m for m in copy.modules() if isinstance(m, ExportAttention)]
    assert len(replaced) == 2 and all(m.mha is not o for m, o in zip(replaced, originals))  # a real copy
    assert isinstance(copy.backbone.trunk, ClassTokenViT)  # the last block for the class token only
    with traced_attention():
        assert float((copy(x) - tower(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize("change", ["avg_pool", "token_outputs"])
def test_vits_that_read_every_token_keep_their_last_block_whole(vit, change):
    tower, x = vit
    trunk = copy.deepcopy(tower.backbone.trunk)
    if change == "avg_pool":
        trunk.pool_type = "avg"
    else:
        trunk.output_tokens = True  # (pooled, patch tokens)
    twin = export_copy(trunk)
    assert not any(isinstance(m, ClassTokenViT) for m in twin.modules())

    def outputs(module):
        out = module(x)
        return out if change == "token_outputs" else (out,)

    with traced_attention():
        for got, expect in zip(outputs(twin), outputs(trunk), strict=True):
            assert float((got - expect).abs().max()) <= 1e-5


@pytest.mark.parametrize("case", ["batch_second_float_mask", "bool_mask", "cross_attention", "weights", "encoder_layer"])
def test_export_attention_equals_multihead_attention(case):
    torch.manual_seed(1)
    x = torch.randn(5, 3, 32)  # (seq, batch, embed) when batch_first is False
    if case == "encoder_layer":  # EGATH's token towers: post-norm TransformerEncoderLayer, batch_first
        module = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True), 2,
                                       enable_nested_tensor=False).eval()
        call = lambda m: m(x.transpose(0, 1))  # noqa: E731
    else:
        module = nn.MultiheadAttention(32, 4).eval()
        if case == "batch_second_float_mask":
            mask = torch.full((5, 5), float("-inf")).triu(1)  # causal, as open_clip's text tower
            call = lambda m: m(x, x, x, need_weights=False, attn_mask=mask)[0]  # noqa: E731
        elif case == "bool_mask":
            mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
            call = lambda m: m(x, x, x, need_weights=False, attn_mask=mask)[0]  # noqa: E731
        elif case == "weights":  # the caller wants the attention weights: handed to nn.MultiheadAttention
            call = lambda m: m(x, x, x)[1]  # noqa: E731
        else:  # not self-attention: handed to nn.MultiheadAttention itself
            memory = torch.randn(7, 3, 32)
            call = lambda m: m(x, memory, memory, need_weights=False)[0]  # noqa: E731
    twin = export_copy(nn.Sequential(module))[0]
    assert any(isinstance(m, ExportAttention) for m in twin.modules())
    with traced_attention():
        assert float((call(twin) - call(module)).abs().max()) <= 1e-5


def test_exported_graph_has_static_heads_and_fuses_into_attention(vit):
    tower, x = vit
    model_bytes = export_tower(tower, x[:2], "pixel_values", 16, "image")
    model, plain = onnx.load_from_string(model_bytes), plain_export(tower, x[:2])
    new, old = ops(model), ops(plain)

    def shape_arithmetic(counts):
        return sum(counts.get(op, 0) for op in ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat"))

    assert new.get("Shape", 0) * 3 < old["Shape"] and shape_arithmetic(new) * 3 < shape_arithmetic(old)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = tower(x).numpy()
    for n in (1, 6):  # the batch axis stays dynamic
        got = session.run(None, {"pixel_values": x[:n].numpy()})[0]
        assert np.abs(got - ref[:n]).max() <= 1e-4

    fused, stats = fuse_transformer(model_bytes, "image")
    # the first block's self-attention; the last block attends from the class token alone
    assert stats["Attention"] == 1 and ops(fused)["Attention"] == 1


def test_int8_dynamic_quantises_all_but_the_hash_head(vit):
    tower, x = vit
    model_bytes = export_tower(tower, x[:2], "pixel_values", 16, "image")
    q_bytes, info = quantize_int8_dynamic(model_bytes, "image")
    assert info["quantized"]["QAttention"] == 1 and info["quantized"]["MatMulInteger"] >= 7
    q = onnx.load_from_string(q_bytes)
    producer = {o: n for n in q.graph.node for o in n.output}
    node = producer[q.graph.output[0].name]
    while node.op_type not in ("MatMul", "Gemm", "MatMulInteger"):
        node = producer[node.input[0]]
    assert node.op_type in ("MatMul", "Gemm")  # the head reads float: the tanh decides the bits
    weights = [onnx.numpy_helper.to_array(t) for t in q.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64  # 7 bits: no 16-bit saturation without VNNI
    spec = ModelSpec("image", "pixel_values", ("batch", 3, 64, 64), "codes", 16)
    backend = create_backend("onnxruntime", q_bytes, spec, threads=1, variant="int8-dynamic")
    with torch.no_grad():
        ref = tower(x).numpy()
    got = backend.run(x.numpy())
    assert got.shape == ref.shape and ((got >= 0) == (ref >= 0)).mean() >= 0.9
    with pytest.raises(BackendUnavailableError, match="runs on onnxruntime"):
        create_backend("tensorrt", q_bytes, spec, device="cuda", variant="int8-dynamic")
