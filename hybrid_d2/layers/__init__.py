"""Building blocks shared by the hybrid_d2 backbone families."""

from .backbone import FEATURE_NAMES, PyramidBackbone
from .bf16 import SmallMapSafeConv2d
from .classifier import (
    ClassifierMixin,
    channel_norm,
    check_in_chans,
    model_name,
    register_classifiers,
)
from .depthwise import DepthwiseConv2d, depthwise_conv2d
from .dilated_attention import dilated_attention
from .family import BackboneFamily, Option
from .mlp import Mlp, gelu_linear, gelu_mlp, pointwise_linear
from .flops import FLOP_HANDLES, MMCV_FLOP_HANDLES, flop_count_analysis, flop_totals
from .stage import Stage, checkpointed, to_channels_first, to_channels_last
from .registration import FAMILIES, add_family_config, register_family
from .norm import FrozenStatsBatchNorm2d, get_norm, inference_affine, norm_for_device
from .window_masks import window_attention_mask
from .windows import (
    pad_to_multiple,
    relative_position_index,
    window_partition,
    window_reverse,
)

__all__ = [
    "FAMILIES",
    "BackboneFamily",
    "Option",
    "add_family_config",
    "register_family",
    "ClassifierMixin",
    "channel_norm",
    "check_in_chans",
    "model_name",
    "register_classifiers",
    "FEATURE_NAMES",
    "FLOP_HANDLES",
    "MMCV_FLOP_HANDLES",
    "FrozenStatsBatchNorm2d",
    "Mlp",
    "PyramidBackbone",
    "SmallMapSafeConv2d",
    "DepthwiseConv2d",
    "depthwise_conv2d",
    "Stage",
    "checkpointed",
    "dilated_attention",
    "flop_count_analysis",
    "flop_totals",
    "gelu_linear",
    "gelu_mlp",
    "pointwise_linear",
    "get_norm",
    "inference_affine",
    "norm_for_device",
    "pad_to_multiple",
    "relative_position_index",
    "to_channels_first",
    "to_channels_last",
    "window_attention_mask",
    "window_partition",
    "window_reverse",
]
