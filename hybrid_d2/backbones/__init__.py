"""Backbone families. Importing this package imports every module in it, and each family module
registers itself (``register_family``): its builder in BACKBONE_REGISTRY, its config keys and its
ImageNet classifiers with timm (``hybrid_<family>_<variant>``). A new family is one more module
here (docs/adding_a_family.md).

For every registered family (``hybrid_d2.layers.FAMILIES``) this package exports, under their own
names, what its module defines: the Detectron2 backbone (``D2MixFormer``), its builder
(``build_mixformer_backbone``), the network (``MixFormer``) and the classifier
(``MixFormerClassifier``); and the generic FPN builders.
"""

import importlib
import pkgutil
import sys
from typing import Any, Dict

from ..layers import FAMILIES, BackboneFamily
from .fpn import build_hybrid_fpn_backbone, build_hybrid_retinanet_backbone

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _exports(family: BackboneFamily) -> Dict[str, Any]:
    """The family's backbone, builder, network and classifier, by name, from its module."""
    module = sys.modules[family.network.__module__]
    names = (
        family.backbone_name,
        family.builder_name,
        family.network.__name__,
        family.classifier.__name__,
    )
    return {name: getattr(module, name) for name in names}


for _family in FAMILIES.values():
    globals().update(_exports(_family))

__all__ = sorted(
    ["build_hybrid_fpn_backbone", "build_hybrid_retinanet_backbone"]
    + [name for family in FAMILIES.values() for name in _exports(family)]
)
