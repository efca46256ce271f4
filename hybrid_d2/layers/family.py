"""The declaration of a backbone family: what the family's module states about itself, read by
its registration (:mod:`hybrid_d2.layers.registration`) and by every table of the families
(``FAMILIES``). docs/adding_a_family.md walks through a new family."""

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from torch import nn

__all__ = ["BackboneFamily", "Option"]

_NETWORK = object()  # Option.default: the network's signature default
_SAME = object()  # Option.config_default: the same as the constructor's


@dataclass(frozen=True)
class Option:
    """A setting of a family's backbone: constructor argument ``name`` and config key
    ``MODEL.<FAMILY>.<NAME>`` (``name.upper()``); ``help`` is the comment that documents the key.

    Each default is written once: ``default`` is the constructor's, where the network's signature
    has none under ``name`` (otherwise the signature's is taken); ``config_default`` is the config
    key's, where it differs from the constructor's (e.g. "SyncBN" in the configs, "BN" for a
    backbone built in Python). ``norm`` marks a norm name, which the builder resolves for the
    device (``SyncBN`` off CUDA becomes Detectron2's naive SyncBN, see ``norm_for_device``).
    """

    name: str
    help: str
    norm: bool = False
    default: Any = _NETWORK
    config_default: Any = _SAME

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
        classifier: the ImageNet classifier (``ClassifierMixin`` over the network), registered
            with timm as ``hybrid_<name>_<variant>``; ``timm_cfg`` updates its pretrained config
            (``register_classifiers``).
        converter: ``"module:function"`` converting the official ImageNet weights (where the
            family has them): ``function(state_dict, variant, keep_head=False) -> (state_dict,
            dropped_keys)``; imported on use, as the converter imports the family.
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
    classifier: type
    timm_cfg: Mapping[str, Any] = field(default_factory=dict)
    converter: Optional[str] = None
    options: Tuple[Option, ...] = ()
    output_norm: bool = True
    extra_variant_keys: Tuple[str, ...] = ()
    imagenet_drop_path: Optional[Mapping[str, float]] = None
    network_options: Optional[Callable[[str, Dict[str, Any]], Dict[str, Any]]] = None
    stem_and_stages: Optional[
        Callable[[nn.Module], Tuple[nn.Module, Sequence[nn.Module]]]
    ] = None
    frozen_modules: Optional[Callable[[nn.Module, int], List[nn.Module]]] = None
    option_names: Tuple[str, ...] = field(init=False)
    constructor_defaults: Dict[str, Any] = field(init=False)
    config_defaults: Dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        constructor = {
            option.name: self._constructor_default(option) for option in self.options
        }
        config = {
            o.name: (
                constructor[o.name] if o.config_default is _SAME else o.config_default
            )
            for o in self.options
        }
        object.__setattr__(self, "option_names", tuple(constructor))
        object.__setattr__(self, "constructor_defaults", constructor)
        object.__setattr__(self, "config_defaults", config)
        if (self.stem_and_stages is None) == (self.frozen_modules is None):
            raise ValueError(
                f"{self.title}: declare exactly one of stem_and_stages, frozen_modules"
            )

    def _constructor_default(self, option: Option) -> Any:
        """``option.default``, or else the network's signature default of ``option.name``."""
        if option.default is not _NETWORK:
            return option.default
        parameter = inspect.signature(self.network).parameters.get(option.name)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            raise ValueError(
                f"{self.title}: option {option.name!r} needs a default: the network's signature "
                "has none"
            )
        return parameter.default

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
        resolved = copy.deepcopy(self.constructor_defaults)
        resolved.update(options)
        return resolved

    def convert_official(
        self, state_dict: Dict[str, Any], variant: str, keep_head: bool = False
    ) -> Tuple[Dict[str, Any], List[str]]:
        """The official ImageNet weights ``state_dict`` renamed for this family's network (without
        the classification head unless ``keep_head``), and the dropped keys (``converter``).
        """
        if self.converter is None:
            raise ValueError(f"{self.title} has no official weights to convert")
        module, function = self.converter.split(":")
        convert = getattr(importlib.import_module(module), function)
        return convert(state_dict, variant, keep_head=keep_head)

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
