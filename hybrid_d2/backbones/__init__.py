"""Backbone families; importing this package registers their builders in BACKBONE_REGISTRY."""
from .fpn import build_hybrid_fpn_backbone, build_hybrid_retinanet_backbone

__all__ = ["build_hybrid_fpn_backbone", "build_hybrid_retinanet_backbone"]
