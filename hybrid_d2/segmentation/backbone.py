"""The backbones of the segmentation models: the bare bottom-up network (UperNet builds its own
pyramid) and Detectron2's FPN P2-P5 (Semantic FPN)."""

from typing import Dict

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN

from ..backbones.fpn import build_bottom_up

__all__ = [
    "BottomUpBackbone",
    "build_hybrid_bottom_up_backbone",
    "build_hybrid_sem_seg_fpn_backbone",
]


class BottomUpBackbone(Backbone):
    """The bottom-up network's features as they are, kept under ``bottom_up`` so that parameter
    names (``backbone.bottom_up.*``) are those of the FPN detectors: converted ImageNet weights and
    layer-wise lr decay apply unchanged."""

    def __init__(self, bottom_up: Backbone):
        super().__init__()
        self.bottom_up = bottom_up

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.bottom_up(x)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.bottom_up.output_shape()

    @property
    def size_divisibility(self) -> int:
        return self.bottom_up.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.bottom_up.padding_constraints


@BACKBONE_REGISTRY.register()
def build_hybrid_bottom_up_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """The network named by ``MODEL.FPN.BOTTOM_UP`` with outputs ``MODEL.FPN.IN_FEATURES``, without
    an FPN (UperNet's head has its own)."""
    return BottomUpBackbone(build_bottom_up(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_hybrid_sem_seg_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """FPN P2-P5 without a P6 block, as mmseg's Semantic FPN neck (size divisibility 32)."""
    return FPN(
        bottom_up=build_bottom_up(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=None,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
