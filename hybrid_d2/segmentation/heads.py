"""Semantic segmentation heads built as mmsegmentation builds them, for Detectron2's
``SemanticSegmentor``: UperNet (with its auxiliary FCN head) and Semantic FPN.

Both return, like Detectron2's ``SemSegFPNHead``, ``(logits at the padded input size, {})`` in
inference and ``(None, losses)`` in training; ``SemanticSegmentor`` crops the padding and resizes
to the record's height and width.
"""

from typing import Dict, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from torch import nn

from ..layers import get_norm, norm_for_device

__all__ = [
    "FCNAuxHead",
    "PyramidPoolingModule",
    "SemanticFPNHead",
    "UperNetHead",
    "sem_seg_loss",
]


def sem_seg_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_value: int, avg_non_ignore: bool
) -> torch.Tensor:
    """Pixel-wise cross entropy of ``logits`` resized (bilinear) to the targets' size.

    ``avg_non_ignore=False`` divides by every pixel, ignored ones counting 0 (mmsegmentation's
    ``CrossEntropyLoss`` default); ``True`` by the labelled pixels only (Detectron2's heads).
    """
    logits = F.interpolate(
        logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
    )
    if avg_non_ignore:
        return F.cross_entropy(
            logits, targets, ignore_index=ignore_value, reduction="mean"
        )
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_value, reduction="none")
    return loss.sum() / max(loss.numel(), 1)


def _conv_norm_relu(
    in_channels: int, out_channels: int, kernel_size: int, norm: str
) -> Conv2d:
    """mmcv's ConvModule: conv without bias, norm, ReLU; Kaiming (fan-out) init as mmcv's."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        bias=False,
        norm=get_norm(norm, out_channels),
        activation=F.relu,
    )
    weight_init.c2_msra_fill(conv)
    return conv


def _classifier(in_channels: int, num_classes: int) -> nn.Conv2d:
    """mmseg's ``conv_seg``: a 1x1 conv with bias, normal(std 0.01) init."""
    conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling (mmseg ``PPM``): average-pool to s x s for each scale s, 1x1
    conv-norm-ReLU, resize back; the input and the branches are concatenated, then fused by a 3x3
    conv-norm-ReLU (UperNet's ``bottleneck``)."""

    def __init__(
        self, in_channels: int, channels: int, pool_scales: Sequence[int], norm: str
    ):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(s), _conv_norm_relu(in_channels, channels, 1, norm)
            )
            for s in pool_scales
        )
        self.bottleneck = _conv_norm_relu(
            in_channels + len(pool_scales) * channels, channels, 3, norm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_resize(branch(x), x.shape[-2:]) for branch in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class FCNAuxHead(nn.Module):
    """mmseg's ``FCNHead`` as UperNet's auxiliary head: ``num_convs`` 3x3 conv-norm-ReLU
    (no input concatenation), Dropout2d, 1x1 classifier."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_convs: int,
        num_classes: int,
        dropout: float,
        norm: str,
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.AUX.NUM_CONVS: expected >= 1, got {num_convs}"
            )
        self.convs = nn.Sequential(
            *(
                _conv_norm_relu(in_channels if i == 0 else channels, channels, 3, norm)
                for i in range(num_convs)
            )
        )
        self.dropout = nn.Dropout2d(dropout)
        self.predictor = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.dropout(self.convs(x)))


def _check_in_features(
    input_shape: Dict[str, ShapeSpec], in_features: Sequence[str], key: str
) -> None:
    missing = [name for name in in_features if name not in input_shape]
    if missing:
        raise ValueError(
            f"{key}={list(in_features)}: the backbone has no {missing}; it outputs "
            f"{sorted(input_shape)}"
        )


@SEM_SEG_HEADS_REGISTRY.register()
class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018) as mmseg's ``UPerHead``: pyramid pooling on the coarsest input,
    1x1 laterals on the others, top-down sum, 3x3 FPN convs, all levels resized to the finest and
    concatenated, a 3x3 ``fpn_bottleneck``, Dropout2d and a 1x1 classifier. With ``aux_in_feature``
    an :class:`FCNAuxHead` adds ``loss_sem_seg_aux`` in training (not used in inference).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: Sequence[str],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: str = "BN",
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        avg_non_ignore: bool = False,
        aux_in_feature: Optional[str] = None,
        aux_channels: int = 256,
        aux_num_convs: int = 1,
        aux_loss_weight: float = 0.4,
    ):
        super().__init__()
        self.in_features = sorted(
            in_features, key=lambda name: input_shape[name].stride
        )
        in_channels = [input_shape[name].channels for name in self.in_features]
        self.common_stride = input_shape[self.in_features[0]].stride
        self.ignore_value, self.loss_weight = ignore_value, loss_weight
        self.avg_non_ignore = avg_non_ignore
        self.ppm = PyramidPoolingModule(in_channels[-1], channels, pool_scales, norm)
        self.lateral_convs = nn.ModuleList(
            _conv_norm_relu(c, channels, 1, norm) for c in in_channels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            _conv_norm_relu(channels, channels, 3, norm) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = _conv_norm_relu(
            len(in_channels) * channels, channels, 3, norm
        )
        self.dropout = nn.Dropout2d(dropout)
        self.predictor = _classifier(channels, num_classes)
        self.aux_in_feature, self.aux_loss_weight = aux_in_feature, aux_loss_weight
        self.aux_head = None
        if aux_in_feature is not None:
            self.aux_head = FCNAuxHead(
                input_shape[aux_in_feature].channels,
                aux_channels,
                aux_num_convs,
                num_classes,
                dropout,
                norm,
            )

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        _check_in_features(
            input_shape, head.IN_FEATURES, "MODEL.SEM_SEG_HEAD.IN_FEATURES"
        )
        aux = head.AUX
        if aux.ENABLED:
            _check_in_features(
                input_shape, [aux.IN_FEATURE], "MODEL.SEM_SEG_HEAD.AUX.IN_FEATURE"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items()},
            "in_features": head.IN_FEATURES,
            "num_classes": head.NUM_CLASSES,
            "channels": head.UPERNET.CHANNELS,
            "pool_scales": head.UPERNET.POOL_SCALES,
            "dropout": head.DROPOUT,
            "norm": norm_for_device(head.NORM, cfg.MODEL.DEVICE),
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
            "avg_non_ignore": head.LOSS_AVG_NON_IGNORE,
            "aux_in_feature": aux.IN_FEATURE if aux.ENABLED else None,
            "aux_channels": aux.CHANNELS,
            "aux_num_convs": aux.NUM_CONVS,
            "aux_loss_weight": aux.LOSS_WEIGHT,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at the finest input's stride (the decode head alone: no auxiliary head)."""
        inputs = [features[name] for name in self.in_features]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.ppm(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + _resize(
                laterals[i], laterals[i - 1].shape[-2:]
            )
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [
            laterals[-1]
        ]
        size = outputs[0].shape[-2:]
        fused = torch.cat([outputs[0]] + [_resize(x, size) for x in outputs[1:]], dim=1)
        return self.predictor(self.dropout(self.fpn_bottleneck(fused)))

    def forward(
        self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        logits = self.layers(features)
        if not self.training:
            scale = float(self.common_stride)
            return (
                F.interpolate(
                    logits, scale_factor=scale, mode="bilinear", align_corners=False
                ),
                {},
            )
        losses = {"loss_sem_seg": self.loss_weight * self._loss(logits, targets)}
        if self.aux_head is not None:
            aux_logits = self.aux_head(features[self.aux_in_feature])
            losses["loss_sem_seg_aux"] = self.aux_loss_weight * self._loss(
                aux_logits, targets
            )
        return None, losses

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sem_seg_loss(logits, targets, self.ignore_value, self.avg_non_ignore)


@SEM_SEG_HEADS_REGISTRY.register()
class SemanticFPNHead(SemSegFPNHead):
    """Detectron2's ``SemSegFPNHead`` (the Semantic FPN head of Kirillov et al. 2019, parameter for
    parameter mmseg's ``FPNHead``) with what the papers' mmseg recipe adds: Dropout2d before the
    classifier, mmseg's loss averaging, and SyncBN that also works on CPU processes."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        dropout: float = 0.1,
        avg_non_ignore: bool = False,
        **kwargs,
    ):
        super().__init__(input_shape, **kwargs)
        self.dropout = nn.Dropout2d(dropout)
        self.avg_non_ignore = avg_non_ignore
        nn.init.normal_(self.predictor.weight, std=0.01)  # mmseg's conv_seg init
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        _check_in_features(
            input_shape, head.IN_FEATURES, "MODEL.SEM_SEG_HEAD.IN_FEATURES"
        )
        args = super().from_config(cfg, input_shape)
        args["norm"] = norm_for_device(head.NORM, cfg.MODEL.DEVICE)
        return dict(args, dropout=head.DROPOUT, avg_non_ignore=head.LOSS_AVG_NON_IGNORE)

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        summed = sum(
            head(features[name])
            for name, head in zip(self.in_features, self.scale_heads)
        )
        return self.predictor(self.dropout(summed))

    def losses(
        self, predictions: torch.Tensor, targets: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        loss = sem_seg_loss(
            predictions, targets, self.ignore_value, self.avg_non_ignore
        )
        return {"loss_sem_seg": loss * self.loss_weight}
