"""Generic FPN wiring: any registered hybrid_d2 bottom-up network under Detectron2's FPN."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7


def build_bottom_up(cfg, input_shape: ShapeSpec) -> Backbone:
    """Build the bottom-up network named by ``MODEL.FPN.BOTTOM_UP``."""
    name = cfg.MODEL.FPN.BOTTOM_UP
    if name not in BACKBONE_REGISTRY:
        known = sorted(n for n in BACKBONE_REGISTRY._obj_map if n.startswith("build_"))
        raise KeyError(f"MODEL.FPN.BOTTOM_UP: no backbone builder named {name!r}; known: {known}")
    return BACKBONE_REGISTRY.get(name)(cfg, input_shape)


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
    source = cfg.MODEL.FPN.TOP_BLOCK_IN_FEATURE
    if source == "p5":
        in_channels = out_channels
    elif source in bottom_up.output_shape():
        in_channels = bottom_up.output_shape()[source].channels
    else:
        raise ValueError(
            f"MODEL.FPN.TOP_BLOCK_IN_FEATURE={source!r}: expected 'p5' or one of "
            f"{sorted(bottom_up.output_shape())}"
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(in_channels, out_channels, in_feature=source),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
