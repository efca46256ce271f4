"""Semantic segmentation with Detectron2's ``SemanticSegmentor``: UperNet and Semantic FPN heads,
their backbones, and multi-scale + flip test-time augmentation (docs/segmentation.md).
"""

from .backbone import (
    BottomUpBackbone,
    build_hybrid_bottom_up_backbone,
    build_hybrid_sem_seg_fpn_backbone,
)
from .heads import (
    FCNAuxHead,
    PyramidPoolingModule,
    SemanticFPNHead,
    UperNetHead,
    sem_seg_loss,
)
from .tta import SemanticSegmentorWithTTA, tta_sizes

__all__ = [
    "BottomUpBackbone",
    "FCNAuxHead",
    "PyramidPoolingModule",
    "SemanticFPNHead",
    "SemanticSegmentorWithTTA",
    "UperNetHead",
    "build_hybrid_bottom_up_backbone",
    "build_hybrid_sem_seg_fpn_backbone",
    "sem_seg_loss",
    "tta_sizes",
]
