"""Building blocks shared by the methods: backbones, hash heads, the label graph and
its GAT classifier, label embeddings, losses, the discrete code update."""

from .backbones import TINY_CLIP_CONFIGS, ImageBackbone, backbone_preprocess, build_image_backbone, load_weights_file
from .discrete import DiscreteCodes
from .gat import GATLabelClassifier, LabelEmbeddings, attention_weights
from .graph import LabelGraph, label_graph
from .hashing import HashHead, binarize, check_bits
from .losses import (classification_loss, cosine_distance, dcg_gains, dcg_triplet_loss, label_distillation_loss,
                     label_similarity, pairwise_nll_loss, quantization_loss, wasserstein_loss)

__all__ = [
    "TINY_CLIP_CONFIGS", "ImageBackbone", "backbone_preprocess", "build_image_backbone", "load_weights_file", "DiscreteCodes",
    "GATLabelClassifier", "LabelEmbeddings", "attention_weights", "LabelGraph", "label_graph", "HashHead",
    "binarize", "check_bits", "classification_loss", "cosine_distance", "dcg_gains", "dcg_triplet_loss",
    "label_distillation_loss", "label_similarity", "pairwise_nll_loss", "quantization_loss", "wasserstein_loss",
]
