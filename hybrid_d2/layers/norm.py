"""Normalisation layers and a ``get_norm`` that extends Detectron2's with them."""

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers import get_norm as d2_get_norm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# The string names that detectron2.layers.get_norm understands (detectron2 0.6 / 0.7).
_D2_NORMS = (
    "BN",
    "SyncBN",
    "FrozenBN",
    "GN",
    "LN",
    "nnSyncBN",
    "naiveSyncBN",
    "naiveSyncBN_N",
)


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never updates them.

    Unlike Detectron2's FrozenBatchNorm2d the affine weight and bias remain trainable parameters, so
    the parameter count and state dict are those of ``nn.BatchNorm2d``. Train mode therefore works
    with any batch size, including a single image on a 1x1 map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=False,
            eps=self.eps,
        )


_NORMS = {"FrozenStatsBN": FrozenStatsBatchNorm2d}


def inference_affine(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The per-channel (scale, shift) a BatchNorm applies when it normalises with its running
    statistics (eval mode, FrozenBN, FrozenStatsBN), so that a preceding linear map can absorb
    it; None when it uses batch statistics or is no BatchNorm."""
    uses_running_stats = isinstance(
        norm, (FrozenBatchNorm2d, FrozenStatsBatchNorm2d)
    ) or (
        isinstance(norm, _BatchNorm) and not norm.training and norm.track_running_stats
    )
    if not uses_running_stats:
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def norm_for_device(norm: str, device: str) -> str:
    """The norm name to build on ``device``: "SyncBN" becomes Detectron2's "naiveSyncBN" off CUDA.

    PyTorch's ``nn.SyncBatchNorm`` kernel is CUDA-only (it raises for CPU inputs once several
    processes train), while Detectron2's ``NaiveSyncBatchNorm`` all-reduces the batch statistics
    with any backend, gloo included. Both give the statistics of the whole batch when the processes
    have equal batch shapes, and have the same parameters and state dict.
    """
    if norm == "SyncBN" and not str(device).startswith("cuda"):
        return "naiveSyncBN"
    return norm


def get_norm(norm: Union[str, Callable[[int], nn.Module]], channels: int) -> nn.Module:
    """Build a normalisation layer over ``channels`` channels.

    Args:
        norm: "FrozenStatsBN", any name Detectron2's ``get_norm`` knows ("BN", "SyncBN",
            "FrozenBN", "GN", "LN", ...), or a callable taking the channel count.
    """
    if callable(norm):
        return norm(channels)
    if norm in _NORMS:
        return _NORMS[norm](channels)
    if norm in _D2_NORMS:
        return d2_get_norm(norm, channels)
    raise ValueError(
        f"unknown norm {norm!r}; expected one of {sorted(_NORMS) + list(_D2_NORMS)}"
    )
