"""Backbone families; importing this package registers their builders in BACKBONE_REGISTRY."""

from .fpn import build_hybrid_fpn_backbone, build_hybrid_retinanet_backbone
from .mixformer import VARIANTS as MIXFORMER_VARIANTS
from .mixformer import D2MixFormer, MixFormer, build_mixformer_backbone

__all__ = [
    "D2MixFormer",
    "MIXFORMER_VARIANTS",
    "MixFormer",
    "build_hybrid_fpn_backbone",
    "build_hybrid_retinanet_backbone",
    "build_mixformer_backbone",
]
