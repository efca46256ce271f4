"""The one Detectron2 backbone wrapper of every family: named pyramid outputs, optional output
LayerNorms, stage freezing, the size constraint and the input check (H, W >= 32)."""

from typing import Any, Dict, List, Optional, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling import Backbone
from torch import nn

from .family import BackboneFamily

__all__ = ["FEATURE_NAMES", "MIN_INPUT_SIZE", "PyramidBackbone", "check_input_shape"]

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
# Smallest input height/width: one stride of res5 (the size_divisibility).
MIN_INPUT_SIZE = 32


def check_input_shape(x: torch.Tensor) -> None:
    """Raise a ValueError unless ``x`` is an (N, 3, H, W) batch with H, W >= MIN_INPUT_SIZE."""
    if x.dim() != 4:
        raise ValueError(
            f"backbone input: expected an (N, 3, H, W) batch, got a {x.dim()}-D tensor of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[1] != 3:
        raise ValueError(
            f"backbone input: expected 3 channels (N, 3, H, W), got shape {tuple(x.shape)}"
        )
    height, width = x.shape[-2:]
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(
            f"backbone input of size {height}x{width} (HxW): height and width must be at least "
            f"{MIN_INPUT_SIZE} (the stride of res5)"
        )


class PyramidBackbone(Backbone):
    """The Detectron2 backbone of every family: the family's four-stage network ``self.net`` with
    named outputs ``res2`` ... ``res5``, optional output LayerNorms and stage freezing.

    ``self.net(x)`` returns the four stage maps (NCHW, strides 4/8/16/32, channels
    ``self.net.channels``), each read after the stage's last block and before the downsampling
    that feeds the next stage. Each family's subclass (``D2MixFormer``, ...) is made by
    ``register_family`` and sets ``family``, the family's declaration.
    """

    family: BackboneFamily

    def __init__(
        self,
        variant: str,
        out_features: Sequence[str] = FEATURE_NAMES,
        drop_path_rate: Optional[float] = None,
        output_norm: Optional[bool] = None,
        freeze_at: int = 0,
        use_checkpoint: bool = False,
        **options: Any,
    ):
        """
        Args:
            variant: a key of ``family.variants``.
            out_features: subset of ("res2", "res3", "res4", "res5").
            drop_path_rate: stochastic depth; None means the variant's default.
            output_norm: a fresh LayerNorm on each output; None means the family's default.
            freeze_at: 0 freezes nothing, 1 the stem, k >= 2 the stem and stages res2 ... res_k
                (each with the downsampling that feeds it); see :meth:`frozen_modules`.
            use_checkpoint: recompute each block in the backward pass to save memory.
            options: the family's own settings (``family.options``; the class docstring).
        """
        super().__init__()
        family = self.family
        config = family.variant_config(variant)
        if drop_path_rate is None:
            drop_path_rate = config["drop_path_rate"]
        self.options = family.resolve_options(options)
        if "depths" in config:
            self.depths = tuple(config["depths"])
        self.net = family.build_network(
            variant, drop_path_rate, use_checkpoint, self.options
        )
        output_norm = family.output_norm if output_norm is None else output_norm
        self._init_outputs(out_features, output_norm, freeze_at)

    def _init_outputs(
        self, out_features: Sequence[str], output_norm: bool, freeze_at: int
    ) -> None:
        """Set the output names/strides/channels, the output norms, and freeze."""
        unknown = [name for name in out_features if name not in FEATURE_NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"out_features {list(out_features)}: expected names from {FEATURE_NAMES}"
            )
        self._out_features = list(out_features)
        self._out_feature_strides = {
            name: 2 ** (i + 2) for i, name in enumerate(FEATURE_NAMES)
        }
        self._out_feature_channels = dict(zip(FEATURE_NAMES, self.net.channels))
        self.output_norms = None
        if output_norm:
            self.output_norms = nn.ModuleDict(
                {
                    name: LayerNorm(self._out_feature_channels[name], eps=1e-5)
                    for name in out_features
                }
            )
        self.freeze(freeze_at)

    @property
    def size_divisibility(self) -> int:
        return 32

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": 32}

    def frozen_modules(self, freeze_at: int) -> List[nn.Module]:
        """The modules ``freeze_at`` freezes: the stem (freeze_at >= 1) and the blocks of stages
        res2 ... res_k (freeze_at = k >= 2) with the downsampling that feeds each of them, which
        sits at the end of the stage before it. A stage frozen entirely (its blocks and its
        downsampling, or its blocks where it has none) is frozen as one module. A family without
        stage modules declares its own ``frozen_modules`` instead."""
        if self.family.frozen_modules is not None:
            return self.family.frozen_modules(self, freeze_at)
        stem, stages = self.family.stem_and_stages(self.net)
        frozen = [stem] if freeze_at >= 1 else []
        last = (
            freeze_at - 2
        )  # the last frozen stage; its downsampling feeds a trainable stage
        for i, stage in enumerate(stages[: max(freeze_at - 1, 0)]):
            whole = i < last or stage.downsample is None
            frozen.append(stage if whole else stage.blocks)
        return frozen

    def freeze(self, freeze_at: int) -> None:
        """Freeze the modules of :meth:`frozen_modules` (mmdetection's ``frozen_stages``).

        Frozen parameters stop requiring gradients, frozen BatchNorms become FrozenBatchNorm2d,
        and frozen modules stay in eval mode (no drop path, no dropout) whatever ``train()`` asks.
        """
        if not 0 <= freeze_at <= len(FEATURE_NAMES) + 1:
            raise ValueError(
                f"freeze_at={freeze_at}: expected 0 ... {len(FEATURE_NAMES) + 1}"
            )
        self._frozen = self.frozen_modules(freeze_at)
        for module in self._frozen:
            for param in module.parameters():
                param.requires_grad = False
            FrozenBatchNorm2d.convert_frozen_batchnorm(module)
        self.train(self.training)

    def train(self, mode: bool = True) -> "PyramidBackbone":
        super().train(mode)
        for module in getattr(self, "_frozen", ()):
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {name: (N, C_i, ceil(H / stride_i), ceil(W / stride_i))}.

        Raises:
            ValueError: for a non-4D or non-RGB input, or a side below MIN_INPUT_SIZE.
        """
        check_input_shape(x)
        outputs = {}
        for name, feature in zip(FEATURE_NAMES, self.net(x)):
            if name in self._out_features:
                outputs[name] = (
                    self.output_norms[name](feature) if self.output_norms else feature
                )
        return outputs
