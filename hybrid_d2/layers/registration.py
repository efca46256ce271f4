"""Registering a declared backbone family (:class:`~hybrid_d2.layers.family.BackboneFamily`).

A family module calls :func:`register_family` once, which gives the family

* its Detectron2 backbone, a :class:`~hybrid_d2.layers.backbone.PyramidBackbone` subclass named
  ``family.backbone_name`` (e.g. ``D2MixFormer``);
* its builder in Detectron2's ``BACKBONE_REGISTRY``, ``build_<name>_backbone``, which reads
  ``cfg.MODEL.<NAME>`` and ``cfg.MODEL.BACKBONE.FREEZE_AT``;
* its config keys ``cfg.MODEL.<NAME>.*`` (:func:`add_family_config`, called for every
  registered family by ``hybrid_d2.config.add_hybrid_config``);
* its classifiers in timm's registry, ``hybrid_<name>_<variant>``;
* its place in :data:`FAMILIES`, from which every table of the families is derived.
"""

import copy
from typing import Callable, Dict, Tuple

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn

from .backbone import FEATURE_NAMES, PyramidBackbone
from .classifier import register_classifiers
from .family import BackboneFamily
from .norm import norm_for_device

__all__ = ["FAMILIES", "add_family_config", "register_family"]

# name -> declaration of every registered family, in registration order
FAMILIES: Dict[str, BackboneFamily] = {}


def add_family_config(cfg: CfgNode, family: BackboneFamily) -> None:
    """Add ``cfg.MODEL.<NAME>``: VARIANT, OUT_FEATURES, DROP_PATH_RATE (None: the variant's),
    the family's options, OUTPUT_NORM and USE_CHECKPOINT."""
    node = CfgNode()
    node.VARIANT = family.default_variant
    node.OUT_FEATURES = list(FEATURE_NAMES)
    node.DROP_PATH_RATE = None
    for option in family.options:
        node[option.key] = copy.deepcopy(family.config_defaults[option.name])
    node.OUTPUT_NORM = family.output_norm
    node.USE_CHECKPOINT = False
    cfg.MODEL[family.config_key] = node


def _make_builder(family: BackboneFamily, backbone: type, module: str) -> Callable:
    def build(cfg: CfgNode, input_shape: ShapeSpec) -> nn.Module:
        if input_shape.channels != 3:
            raise ValueError(
                f"{family.title} expects 3 input channels, got {input_shape.channels}"
            )
        node = cfg.MODEL[family.config_key]
        options = {
            option.name: (
                norm_for_device(node[option.key], cfg.MODEL.DEVICE)
                if option.norm
                else node[option.key]
            )
            for option in family.options
        }
        return backbone(
            variant=node.VARIANT,
            out_features=node.OUT_FEATURES,
            drop_path_rate=node.DROP_PATH_RATE,
            output_norm=node.OUTPUT_NORM,
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
            use_checkpoint=node.USE_CHECKPOINT,
            **options,
        )

    build.__name__ = build.__qualname__ = family.builder_name
    build.__module__ = module
    build.__doc__ = (
        f"Build a {family.backbone_name} from ``cfg.MODEL.{family.config_key}`` and "
        "``cfg.MODEL.BACKBONE.FREEZE_AT``."
    )
    return build


def _backbone_doc(family: BackboneFamily) -> str:
    lines = [
        f"Detectron2 backbone around ``{family.network.__name__}``: named outputs ``res2`` ... "
        "``res5`` (hybrid_d2.layers.PyramidBackbone).",
        "",
        f"Options (keyword arguments; config keys ``MODEL.{family.config_key}.<NAME>``):",
    ]
    defaults = family.constructor_defaults
    lines += [f"    {o.name}={defaults[o.name]!r}: {o.help}" for o in family.options]
    return "\n".join(lines)


def register_family(family: BackboneFamily, module: str) -> Tuple[type, Callable]:
    """Register ``family``: its backbone class, its builder in ``BACKBONE_REGISTRY``, its config
    keys (through :data:`FAMILIES`) and its classifier's timm models.

    Args:
        module: the family module's ``__name__``; the backbone class, the builder and the timm
            entry points are defined there (so that they pickle and show in its namespace).

    Returns:
        The backbone class and the builder, to be bound to their names in the family module.
    """
    if family.name in FAMILIES:
        raise ValueError(
            f"a backbone family named {family.name!r} is already registered"
        )
    backbone = type(
        family.backbone_name,
        (PyramidBackbone,),
        {"family": family, "__module__": module, "__doc__": _backbone_doc(family)},
    )
    builder = _make_builder(family, backbone, module)
    BACKBONE_REGISTRY.register(builder)
    family.classifier.family = family
    register_classifiers(
        module, family.name, family.classifier, family.variants, **family.timm_cfg
    )
    FAMILIES[family.name] = family
    return backbone, builder
