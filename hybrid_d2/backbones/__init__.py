"""Backbone families. Importing this package imports every module in it, and each family module
registers itself (``register_family``): its builder in BACKBONE_REGISTRY, its config keys and its
ImageNet classifiers with timm (``hybrid_<family>_<variant>``). A new family is one more module
here (docs/adding_a_family.md)."""

import importlib
import pkgutil

from .dilateformer import VARIANTS as DILATEFORMER_VARIANTS
from .dilateformer import D2DilateFormer, DilateFormer, build_dilateformer_backbone
from .dilateformer import DilateFormerClassifier
from .dualformer import VARIANTS as DUALFORMER_VARIANTS
from .dualformer import D2DualFormer, DualFormer, build_dualformer_backbone
from .dualformer import DualFormerClassifier
from .dmf import VARIANTS as DMF_VARIANTS
from .dmf import D2DynamicMobileFormer, DynamicMobileFormer, build_dmf_backbone
from .dmf import DMFClassifier
from .dmformer import VARIANTS as DMFORMER_VARIANTS
from .dmformer import D2DMFormer, DMFormer, build_dmformer_backbone
from .dmformer import DMFormerClassifier
from .fpn import build_hybrid_fpn_backbone, build_hybrid_retinanet_backbone
from .mixformer import VARIANTS as MIXFORMER_VARIANTS
from .mixformer import D2MixFormer, MixFormer, build_mixformer_backbone
from .mixformer import MixFormerClassifier

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "D2DilateFormer",
    "DILATEFORMER_VARIANTS",
    "DilateFormer",
    "DilateFormerClassifier",
    "build_dilateformer_backbone",
    "D2DualFormer",
    "DUALFORMER_VARIANTS",
    "DualFormer",
    "DualFormerClassifier",
    "build_dualformer_backbone",
    "D2DynamicMobileFormer",
    "DMF_VARIANTS",
    "DynamicMobileFormer",
    "DMFClassifier",
    "build_dmf_backbone",
    "D2DMFormer",
    "DMFORMER_VARIANTS",
    "DMFormer",
    "DMFormerClassifier",
    "build_dmformer_backbone",
    "D2MixFormer",
    "MIXFORMER_VARIANTS",
    "MixFormer",
    "MixFormerClassifier",
    "build_hybrid_fpn_backbone",
    "build_hybrid_retinanet_backbone",
    "build_mixformer_backbone",
]
