"""Generic FPN wiring: any registered hybrid_d2 bottom-up network under Detectron2's FPN."""

import math

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7


def build_bottom_up(cfg, input_shape: ShapeSpec) -> Backbone:
    """Build the bottom-up network named by ``MODEL.FPN.BOTTOM_UP``.

    Its outputs must be exactly ``MODEL.FPN.IN_FEATURES``: an output the FPN does not read would
    leave parameters (e.g. an output norm) without gradients, which DistributedDataParallel
    rejects.
    """
    name = cfg.MODEL.FPN.BOTTOM_UP
    if name not in BACKBONE_REGISTRY:
        known = sorted(n for n in BACKBONE_REGISTRY._obj_map if n.startswith("build_"))
        raise KeyError(
            f"MODEL.FPN.BOTTOM_UP: no backbone builder named {name!r}; known: {known}"
        )
    bottom_up = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    outputs, in_features = sorted(bottom_up.output_shape()), sorted(
        cfg.MODEL.FPN.IN_FEATURES
    )
    if outputs != in_features:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES={in_features} but the bottom-up network {name} outputs "
            f"{outputs}: set the family's OUT_FEATURES (e.g. MODEL.MIXFORMER.OUT_FEATURES) to "
            "the FPN's input features"
        )
    return bottom_up


@BACKBONE_REGISTRY.register()
def build_hybrid_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """FPN P2-P6 (P6 by max-pooling P5), as in Detectron2's R-CNN FPN configs."""
    return FPN(
        bottom_up=build_bottom_up(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_hybrid_retinanet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """FPN P3-P7 for RetinaNet; P6/P7 come from ``MODEL.FPN.TOP_BLOCK_IN_FEATURE`` (res5 or p5)."""
    bottom_up = build_bottom_up(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    # P6 is computed from the coarsest level: its bottom-up feature (C5) or its FPN output (P5).
    coarsest = cfg.MODEL.FPN.IN_FEATURES[-1]
    shape = bottom_up.output_shape()[coarsest]
    fpn_output = f"p{int(math.log2(shape.stride))}"
    in_channels = {coarsest: shape.channels, fpn_output: out_channels}
    source = cfg.MODEL.FPN.TOP_BLOCK_IN_FEATURE
    if source not in in_channels:
        raise ValueError(
            f"MODEL.FPN.TOP_BLOCK_IN_FEATURE={source!r}: expected {coarsest!r} (the coarsest "
            f"bottom-up feature) or {fpn_output!r} (its FPN output)"
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(in_channels[source], out_channels, in_feature=source),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
