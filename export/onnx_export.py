"""Towers to ONNX: TorchScript exporter, opset 17, dynamic batch axis, checked graphs.

The TorchScript exporter (``dynamo=False``) is used on purpose: it handles the attention
blocks of open_clip towers with a dynamic batch axis, where torch.export still
specialises or fails (nn.MultiheadAttention has no fake-tensor kernel for its fused path).
The fused MHA fast path is switched off while exporting: it is one opaque kernel
(``aten::_native_multi_head_attention``) the exporter cannot translate.

What is traced is a copy of the tower whose ``nn.MultiheadAttention`` modules are replaced by
:class:`ExportAttention`: the same weights and arithmetic, written with static head reshapes.
The TorchScript export of ``nn.MultiheadAttention`` computes every head reshape from the
input's shape at run time (~700 shape nodes in a ViT-B/32 graph) and splits the input
projection in a way onnxruntime's attention fusion does not recognise; the copy's graph has
separate q/k/v MatMuls, constant head counts and the pattern onnxruntime fuses into one
``Attention`` node (``int8-dynamic``). An open_clip ViT that outputs its class token also
becomes a :class:`ClassTokenViT`, whose last block works on that token alone. The copy must
give the tower's outputs (checked).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings

import torch
import torch.nn.functional as F
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


# The export copy must compute what the tower computes; float reassociation stays far below this.
COPY_TOLERANCE = 1e-5


class ExportAttention(nn.Module):
    """Self-attention of an ``nn.MultiheadAttention``, written for export: q, k and v as
    three MatMul+Add, heads split by reshapes with constant head counts (the sequence length
    is fixed by the input size), k transposed once, scores scaled after the product.

    It shares ``mha``'s parameters and takes its call signature. Cross-attention, key
    padding masks, causal flags and calls that want the attention weights go to ``mha``
    itself (exported as before).
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.mha = mha
        # Attributes TransformerEncoder(Layer) reads in its fast-path checks.
        self.batch_first = mha.batch_first
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.num_heads, self.embed_dim, self.head_dim = mha.num_heads, mha.embed_dim, mha.head_dim

    def merge_masks(self, *args, **kwargs):
        return self.mha.merge_masks(*args, **kwargs)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        mha = self.mha
        plain = (key is query and value is query and key_padding_mask is None and not is_causal and not need_weights
                 and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn
                 and (mha.dropout == 0.0 or not mha.training) and (attn_mask is None or attn_mask.dim() == 2))
        if not plain:
            return mha(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                       attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        out = self.attend(x, x, attn_mask)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def attend(self, xq: torch.Tensor, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Batch-first attention of the tokens ``xq`` (B, m, e) over the tokens ``x`` (B, n, e);
        ``xq is x`` is self-attention."""
        mha = self.mha
        # int(): constants in the graph; the batch axis stays dynamic (read once from the shape).
        m, n, heads, d, e = int(xq.shape[1]), int(x.shape[1]), self.num_heads, self.head_dim, self.embed_dim
        batch = x.shape[0]
        w, b = mha.in_proj_weight, mha.in_proj_bias

        def project(i: int, tokens: torch.Tensor, count: int) -> torch.Tensor:
            y = F.linear(tokens, w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
            return y.reshape(batch, count, heads, d)

        q = project(0, xq, m).permute(0, 2, 1, 3)  # (B, heads, m, d)
        k = project(1, x, n).permute(0, 2, 3, 1)  # (B, heads, d, n)
        v = project(2, x, n).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k) * (1.0 / math.sqrt(d))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True: not allowed to attend
                attn_mask = torch.zeros_like(attn_mask, dtype=x.dtype).masked_fill(attn_mask, float("-inf"))
            scores = scores + attn_mask
        out = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).reshape(batch, m, e)
        return mha.out_proj(out)


class ClassTokenViT(nn.Module):
    """An open_clip ``VisionTransformer`` that pools its class token, written for export: its
    last block computes the attention query, the MLP and the residuals for the class token
    alone (keys and values still come from every token). Nothing after that block reads
    the other tokens, so the output is the same; a ViT-B/32 does ~7% less arithmetic.

    Built by :func:`export_copy` (after the attention modules became :class:`ExportAttention`)
    only where :func:`_pools_class_token` holds.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit, transformer = self.vit, self.vit.transformer
        *blocks, last = transformer.resblocks
        x = vit._embeds(images)  # (B, n, width)
        x = x if transformer.batch_first else x.transpose(0, 1)
        for block in blocks:
            x = block(x)
        x = x if transformer.batch_first else x.transpose(0, 1)
        tokens = last.ln_1(x)
        cls = x[:, :1] + last.ls_1(last.attn.attend(tokens[:, :1], tokens))
        cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
        pooled = vit.ln_post(cls[:, 0])  # a per-token LayerNorm: before or after pooling is the same
        return pooled @ vit.proj if vit.proj is not None else pooled


def _pools_class_token(module: nn.Module) -> bool:
    """An open_clip VisionTransformer whose output is its class token after plain
    self-attention blocks (no attention pooling, no token outputs)."""
    try:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    except ImportError:
        return False
    if type(module) is not VisionTransformer:
        return False
    blocks = list(module.transformer.resblocks)
    return (module.pool_type == "tok" and module.attn_pool is None and not module.output_tokens and bool(blocks)
            and all(type(b) is ResidualAttentionBlock and isinstance(b.attn, ExportAttention)
                    and not hasattr(b, "ln_1_kv") for b in blocks))


def export_copy(tower: nn.Module) -> nn.Module:
    """A deep copy of ``tower`` with every ``nn.MultiheadAttention`` replaced by
    :class:`ExportAttention` and every class-token ViT by :class:`ClassTokenViT` (the
    tower itself is left as it is)."""
    twin = copy.deepcopy(tower)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, name, ExportAttention(child))
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if _pools_class_token(child):
                setattr(module, name, ClassTokenViT(child))
    return twin


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
    original, wrapped = _Float32Out(tower), _Float32Out(export_copy(tower))
    buffer = io.BytesIO()
    with _export_mode(original), _export_mode(wrapped), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        expected, out = original(example), wrapped(example)
        if out.shape != (example.shape[0], bits):
            raise ExportError(f"the {what} tower returns shape {tuple(out.shape)} for {example.shape[0]} items, not (N, {bits})")
        delta = float((out - expected).abs().max())
        if not delta <= COPY_TOLERANCE:
            raise ExportError(f"the export copy of the {what} tower (static-shape attention) differs from it by "
                              f"{delta:.2e} > {COPY_TOLERANCE:g}; its attention modules are not plain self-attention")
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
