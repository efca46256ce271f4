"""One declaration per backbone family, and the one registration that serves them all.

A family module (``hybrid_d2/backbones/<family>.py``) holds its network, its variant table and
its ImageNet classifier, declares itself with a :class:`BackboneFamily` and calls
:func:`register_family` once. That gives the family

* its Detectron2 backbone, a :class:`~hybrid_d2.layers.backbone.PyramidBackbone` subclass named
  ``family.backbone_name`` (e.g. ``D2MixFormer``);
* its builder in Detectron2's ``BACKBONE_REGISTRY``, ``build_<name>_backbone``, which reads
  ``cfg.MODEL.<NAME>`` and ``cfg.MODEL.BACKBONE.FREEZE_AT``;
* its config keys ``cfg.MODEL.<NAME>.*`` (:func:`add_family_config`, called for every
  registered family by ``hybrid_d2.config.add_hybrid_config``);
* its classifiers in timm's registry, ``hybrid_<name>_<variant>``.

docs/adding_a_family.md walks through a new family.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn

from .norm import norm_for_device

__all__ = [
    "FAMILIES",
    "BackboneFamily",
    "Option",
    "add_family_config",
    "register_family",
]

_SAME = object()  # Option.argument_default: the same as the config's default


@dataclass(frozen=True)
class Option:
    """A setting of a family's backbone: constructor argument ``name``, config key
    ``MODEL.<FAMILY>.<NAME>`` (``name.upper()``) with ``default``, and ``help``, the comment
    that documents the key. ``norm`` marks a norm name, which the builder resolves for the
    device (``SyncBN`` off CUDA becomes Detectron2's naive SyncBN, see ``norm_for_device``).
    ``argument_default``, where given, is the constructor's default when it differs from the
    config's (e.g. "BN" for a backbone built in Python, "SyncBN" in the configs)."""

    name: str
    default: Any
    help: str
    norm: bool = False
    argument_default: Any = _SAME

    @property
    def constructor_default(self) -> Any:
        return self.default if self.argument_default is _SAME else self.argument_default

    @property
    def key(self) -> str:
        return self.name.upper()


@dataclass(frozen=True)
class BackboneFamily:
    """What a family declares; :func:`register_family` builds the rest from it.

    Attributes:
        name: lower-case name: the config namespace ``MODEL.<NAME>``, the builder
            ``build_<name>_backbone`` and the timm models ``hybrid_<name>_<variant>``.
        title: the name in messages ("MixFormer").
        backbone_name: the class name of the family's Detectron2 backbone ("D2MixFormer").
        network: the four-stage network: ``network(**variant architecture, drop_path_rate=...,
            use_checkpoint=..., **options)`` returns a module whose forward gives the res2 ... res5
            maps and whose ``channels`` are their widths.
        variants: variant name -> the network's architecture arguments plus ``drop_path_rate``,
            the variant's detection default (and ``extra_variant_keys``).
        default_variant: ``MODEL.<NAME>.VARIANT``'s default.
        variant_help, drop_path_help: the comments of the VARIANT and DROP_PATH_RATE keys.
        options: the family's own settings, in config order.
        output_norm: ``MODEL.<NAME>.OUTPUT_NORM``'s default (a fresh LayerNorm on each output).
        extra_variant_keys: keys of a variant that are not network arguments.
        imagenet_drop_path: the classifiers' drop-path default per variant; None: the variant's.
        network_options: maps (variant, options) to the network's keyword arguments, checking
            them; default: the options as they are.
        stem_and_stages: the network's stem and its four :class:`~hybrid_d2.layers.Stage` s
            (blocks, then the downsampling that feeds the next stage; none in the last), what
            ``MODEL.BACKBONE.FREEZE_AT`` freezes (``PyramidBackbone.frozen_modules``).
        frozen_modules: replaces the stage-wise freezing: (backbone, freeze_at) -> modules.
    """

    name: str
    title: str
    backbone_name: str
    network: Type[nn.Module]
    variants: Dict[str, Dict[str, Any]]
    default_variant: str
    variant_help: str
    drop_path_help: str
    options: Tuple[Option, ...] = ()
    output_norm: bool = True
    extra_variant_keys: Tuple[str, ...] = ()
    imagenet_drop_path: Optional[Mapping[str, float]] = None
    network_options: Optional[Callable[[str, Dict[str, Any]], Dict[str, Any]]] = None
    stem_and_stages: Optional[Callable[[nn.Module], Tuple[nn.Module, Sequence[nn.Module]]]] = None
    frozen_modules: Optional[Callable[[nn.Module, int], List[nn.Module]]] = None
    option_names: Tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "option_names", tuple(option.name for option in self.options))
        if (self.stem_and_stages is None) == (self.frozen_modules is None):
            raise ValueError(
                f"{self.title}: declare exactly one of stem_and_stages, frozen_modules"
            )

    @property
    def config_key(self) -> str:
        return self.name.upper()

    @property
    def builder_name(self) -> str:
        return f"build_{self.name}_backbone"

    def variant_config(self, variant: str) -> dict:
        """A copy of the variant's table entry; a ValueError names the known variants."""
        if variant not in self.variants:
            raise ValueError(
                f"unknown {self.title} variant {variant!r}; expected one of {sorted(self.variants)}"
            )
        return dict(self.variants[variant])

    def architecture(self, variant: str) -> dict:
        """The variant's network arguments (without drop_path_rate and the extra keys)."""
        config = self.variant_config(variant)
        for key in ("drop_path_rate",) + self.extra_variant_keys:
            config.pop(key, None)
        return config

    def default_drop_path(self, variant: str, imagenet: bool = False) -> float:
        """The variant's detection drop-path rate, or (``imagenet``) its classifier's."""
        config = self.variant_config(variant)
        if imagenet and self.imagenet_drop_path is not None:
            return self.imagenet_drop_path[variant]
        return config["drop_path_rate"]

    def resolve_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """The declared options' defaults updated with ``options``; unknown names raise."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise TypeError(
                f"{self.backbone_name}: unknown option(s) {unknown}; expected "
                f"{list(self.option_names)} besides variant, out_features, drop_path_rate, "
                "output_norm, freeze_at, use_checkpoint"
            )
        resolved = {o.name: copy.deepcopy(o.constructor_default) for o in self.options}
        resolved.update(options)
        return resolved

    def build_network(
        self,
        variant: str,
        drop_path_rate: float,
        use_checkpoint: bool,
        options: Dict[str, Any],
    ) -> nn.Module:
        """The network of ``variant`` with the given settings."""
        architecture = self.architecture(variant)
        if self.network_options is not None:
            options = self.network_options(variant, options)
        return self.network(
            **architecture,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            **options,
        )


# name -> declaration of every registered family, in registration order
FAMILIES: Dict[str, BackboneFamily] = {}


def add_family_config(cfg: CfgNode, family: BackboneFamily) -> None:
    """Add ``cfg.MODEL.<NAME>``: VARIANT, OUT_FEATURES, DROP_PATH_RATE (None: the variant's),
    the family's options, OUTPUT_NORM and USE_CHECKPOINT."""
    from .backbone import FEATURE_NAMES

    node = CfgNode()
    node.VARIANT = family.default_variant
    node.OUT_FEATURES = list(FEATURE_NAMES)
    node.DROP_PATH_RATE = None
    for option in family.options:
        node[option.key] = copy.deepcopy(option.default)
    node.OUTPUT_NORM = family.output_norm
    node.USE_CHECKPOINT = False
    cfg.MODEL[family.config_key] = node


def _make_builder(family: BackboneFamily, backbone: type, module: str) -> Callable:
    def build(cfg: CfgNode, input_shape: ShapeSpec) -> nn.Module:
        if input_shape.channels != 3:
            raise ValueError(f"{family.title} expects 3 input channels, got {input_shape.channels}")
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
    lines += [f"    {o.name}={o.constructor_default!r}: {o.help}" for o in family.options]
    return "\n".join(lines)


def register_family(
    family: BackboneFamily,
    module: str,
    classifier: Optional[type] = None,
    timm_cfg: Optional[Mapping[str, Any]] = None,
) -> Tuple[type, Callable]:
    """Register ``family``: its backbone class, its builder in ``BACKBONE_REGISTRY``, its config
    keys (through :data:`FAMILIES`) and, given ``classifier``, its timm models (``timm_cfg``
    updates their pretrained config, see ``register_classifiers``).

    Args:
        module: the family module's ``__name__``; the backbone class, the builder and the timm
            entry points are defined there (so that they pickle and show in its namespace).

    Returns:
        The backbone class and the builder, to be bound to their names in the family module.
    """
    from .backbone import PyramidBackbone
    from .classifier import register_classifiers

    if family.name in FAMILIES:
        raise ValueError(f"a backbone family named {family.name!r} is already registered")
    backbone = type(
        family.backbone_name,
        (PyramidBackbone,),
        {"family": family, "__module__": module, "__doc__": _backbone_doc(family)},
    )
    builder = _make_builder(family, backbone, module)
    BACKBONE_REGISTRY.register(builder)
    if classifier is not None:
        classifier.family = family
        register_classifiers(module, family.name, classifier, family.variants, **(timm_cfg or {}))
    FAMILIES[family.name] = family
    return backbone, builder
