"""What the families' ImageNet classifiers share: timm's classifier interface and their
registration with ``timm.models.register_model`` (docs/pretraining.md).

Each family's classifier subclasses its trunk (same modules, so official checkpoints keep their
key names) and adds the paper's tail; this module gives them ``forward_head``, ``forward``,
``get_classifier`` / ``reset_classifier``, timm's feature extraction (``feature_info``,
``forward_intermediates``, ``prune_intermediate_layers``: ``timm.create_model(name,
features_only=True)`` returns the trunk's four maps, those of the Detectron2 backbone) and one
timm entry point per variant named ``hybrid_<family>_<variant>``.
"""

import sys
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from .stage import to_channels_first, to_channels_last

__all__ = [
    "MODEL_PREFIX",
    "ClassifierMixin",
    "channel_norm",
    "check_in_chans",
    "model_name",
    "register_classifiers",
]

MODEL_PREFIX = "hybrid_"  # timm has no model of that name: ours never shadow timm's
GLOBAL_POOLS = (
    "avg",
    "",
)  # timm's global_pool values the classifiers take: average, none
NUM_FEATURE_MAPS = 4  # the trunk's outputs: strides 4, 8, 16, 32


def model_name(family: str, variant: str) -> str:
    """timm name of a family's variant, e.g. ``hybrid_mixformer_b1``."""
    return f"{MODEL_PREFIX}{family}_{variant}"


def check_in_chans(in_chans: int, family: str) -> None:
    """The trunks take RGB only; timm's scripts pass ``in_chans``."""
    if in_chans != 3:
        raise ValueError(
            f"{family} classifiers take 3 input channels, got in_chans={in_chans}"
        )


def check_global_pool(global_pool: str, num_classes: int) -> None:
    """Average pooling or none ('', with no classes: forward returns the unpooled map)."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(
            f"global_pool={global_pool!r}: the classifiers pool by average ('avg') or not at "
            "all ('')"
        )
    if not global_pool and num_classes:
        raise ValueError(
            f"global_pool='' with num_classes={num_classes}: an unpooled model has no "
            "classifier; use num_classes=0"
        )


def channel_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm over the channels of an NCHW map."""
    return to_channels_first(norm(to_channels_last(x)))


class ClassifierMixin:
    """timm's classifier interface over ``forward_features`` (an NCHW map): global average pool
    (``global_pool='avg'``; ``''``: none, ``forward`` returns the map), dropout (timm's
    ``--drop``), then ``self.head``; and timm's feature extraction over the trunk's four maps.

    A family's classifier subclasses ``(ClassifierMixin, <its network>)``; ``family`` (set by
    ``register_family``) gives the variant's architecture and drop-path default. Subclasses set
    ``NETWORK_DEFAULTS`` (the network settings ImageNet training uses), build their
    classification-only modules in :meth:`_init_tail` and name them in ``TAIL``, and
    ``FEATURE_MODULES`` (the modules whose outputs are the four maps) when the family declares
    no stages.
    """

    TAIL: Tuple[str, ...] = ()
    FEATURE_MODULES: Optional[Tuple[str, ...]] = None
    NETWORK_DEFAULTS: Dict[str, Any] = {
        "norm": "BN"
    }  # every BatchNorm with batch statistics
    family: Any  # the family's BackboneFamily

    def __init__(
        self,
        variant: str,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: Optional[float] = None,
        global_pool: str = "avg",
        **kwargs: Any,
    ):
        """
        Args:
            variant: a key of the family's variant table.
            num_classes: classes of the head (0: pooled features).
            in_chans: must be 3 (timm's scripts pass it).
            global_pool: "avg", or "" (with num_classes=0) for the unpooled map.
            drop_rate: dropout before the head.
            drop_path_rate: stochastic depth; None means the variant's ImageNet value.
            kwargs: the network's own settings, over ``NETWORK_DEFAULTS``.
        """
        check_in_chans(in_chans, self.family.title)
        check_global_pool(global_pool, num_classes)
        if drop_path_rate is None:
            drop_path_rate = self.family.default_drop_path(variant, imagenet=True)
        settings = {**self.NETWORK_DEFAULTS, **kwargs}
        super().__init__(
            **self.family.architecture(variant),
            drop_path_rate=drop_path_rate,
            **settings,
        )
        self.global_pool = global_pool
        num_features = self._init_tail(variant, drop_path_rate, settings)
        self._init_head(num_features, num_classes, drop_rate)
        self.feature_info = self._feature_info()

    def _init_tail(
        self, variant: str, drop_path_rate: float, settings: Dict[str, Any]
    ) -> int:
        """Build the modules between the network and the pool (``settings``: the network's
        keyword arguments); return the pooled width."""
        raise NotImplementedError

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = num_features
        self.head_hidden_size = (
            num_features  # timm: the width of forward_head(pre_logits=True)
        )
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_classifier(num_classes)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        head = (
            nn.Linear(self.num_features, num_classes)
            if num_classes > 0
            else nn.Identity()
        )
        head.apply(self._init_weights)
        return head

    def _feature_info(self) -> List[Dict[str, Any]]:
        """timm's description of the four maps: channels, stride, producing module."""
        modules = self.FEATURE_MODULES
        if modules is None:
            names = {id(module): name for name, module in self.named_modules()}
            modules = tuple(
                names[id(stage)] for stage in self.family.stem_and_stages(self)[1]
            )
        return [
            dict(num_chs=channels, reduction=2 ** (i + 2), module=module)
            for i, (channels, module) in enumerate(zip(self.channels, modules))
        ]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C) global average pool."""
        return x.mean(dim=(2, 3))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout, head; with ``global_pool=''`` the map as it is (no head)."""
        if not self.global_pool:
            return x
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> List[torch.Tensor]:
        """timm's feature getter: the trunk's maps ``indices`` (None: all four; an int n: the
        last n), as the Detectron2 backbone's res2 ... res5 (without its output norms). The
        four stages always run (``stop_early`` changes nothing).

        Raises:
            ValueError: for ``norm``, an ``output_fmt`` other than NCHW, or
                ``intermediates_only=False`` (the classifier's map is ``forward_features``).
        """
        if norm or output_fmt != "NCHW" or not intermediates_only:
            raise ValueError(
                f"norm={norm}, output_fmt={output_fmt!r}, intermediates_only="
                f"{intermediates_only}: hybrid_* models give their NCHW maps without norm only "
                "(intermediates_only=True); forward_features gives the classifier's map"
            )
        take_indices, _ = feature_take_indices(NUM_FEATURE_MAPS, indices)
        maps = super().forward(x)  # the trunk's: the next class after the mixin
        return [maps[i] for i in take_indices]

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """For ``features_only``: drop the classification tail (``TAIL``: its norm and head
        included, whatever ``prune_norm`` and ``prune_head``: the maps come before them);
        return the absolute indices of ``indices``."""
        take_indices, _ = feature_take_indices(NUM_FEATURE_MAPS, indices)
        for name in self.TAIL:
            setattr(self, name, nn.Identity())
        self.num_classes, self.global_pool = 0, ""
        return take_indices

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(
        self, num_classes: int, global_pool: Optional[str] = None
    ) -> None:
        """A fresh classifier for ``num_classes`` (0: pooled features); ``global_pool``: "avg",
        or "" with 0 classes for the unpooled map; None keeps the current one."""
        self._set_global_pool(num_classes, global_pool)
        self.num_classes = num_classes
        self.head = self._new_classifier(num_classes)

    def _set_global_pool(self, num_classes: int, global_pool: Optional[str]) -> None:
        global_pool = self.global_pool if global_pool is None else global_pool
        check_global_pool(global_pool, num_classes)
        self.global_pool = global_pool

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in self.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enable


def _entrypoint(cls: Type[nn.Module], name: str, variant: str, module: str) -> Callable:
    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        # features_only: timm's FeatureGetterNet over forward_intermediates, all four maps
        features = dict(
            feature_cls="getter", out_indices=tuple(range(NUM_FEATURE_MAPS))
        )
        return build_model_with_cfg(
            partial(cls, variant), name, pretrained, feature_cfg=features, **kwargs
        )

    create.__name__ = create.__qualname__ = name
    create.__module__ = module
    create.__doc__ = f"{cls.__name__} {variant!r} for timm.create_model."
    return create


def register_classifiers(
    module: str,
    family: str,
    cls: Type[nn.Module],
    variants: Iterable[str],
    **cfg: Any,
) -> List[str]:
    """Register ``cls(variant, ...)`` with timm for every variant, as ``hybrid_<family>_<v>``.

    ``cfg`` updates the pretrained config (input size 224, ImageNet mean/std, bicubic,
    crop_pct 0.875 unless given; ``classifier`` names the head for timm's fine-tuning).
    The entry points become attributes of ``module`` (the family's module).
    """
    base: Dict[str, Any] = dict(
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        num_classes=1000,
        classifier="head",
    )
    variants = list(variants)
    names = [model_name(family, v) for v in variants]
    target = sys.modules[module]
    target.default_cfgs = generate_default_cfgs(
        {name: {**base, **cfg} for name in names}
    )
    for name, variant in zip(names, variants):
        entrypoint = _entrypoint(cls, name, variant, module)
        setattr(target, name, entrypoint)
        register_model(entrypoint)
    return names
