"""hybrid_d2: hybrid CNN-Transformer backbones for Detectron2.

Importing it registers the backbone builders (BACKBONE_REGISTRY), the segmentation heads
(SEM_SEG_HEADS_REGISTRY) and the shapes datasets.
"""

from . import backbones, data, segmentation  # noqa: F401
from .config import add_hybrid_config, get_config

__version__ = "0.1.0"
__all__ = ["add_hybrid_config", "get_config"]
