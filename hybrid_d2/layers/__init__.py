"""Building blocks shared by the hybrid_d2 backbone families."""

from .norm import FrozenStatsBatchNorm2d, get_norm
from .windows import pad_to_multiple, relative_position_index, window_partition, window_reverse

__all__ = [
    "FrozenStatsBatchNorm2d",
    "get_norm",
    "pad_to_multiple",
    "relative_position_index",
    "window_partition",
    "window_reverse",
]
