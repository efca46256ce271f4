"""Fused CPU inference kernels for Linear (+ GELU) and Conv2d (+ frozen BatchNorm, + GELU).

On CPU, ``F.gelu(F.linear(x, w, b))`` makes three passes over its output (the bias is copied in
before the GEMM, then the GEMM, then GELU), and a conv + BatchNorm + GELU stem makes three passes
over full-resolution maps. oneDNN computes the bias and the activation in the GEMM/convolution
epilogue, and a frozen BatchNorm folds into the convolution's weights. PyTorch exposes these
kernels as ``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise`` (TorchInductor's CPU
backend calls them); they have no autograd formula, so they are used only where nothing needs a
gradient: fp32 CPU tensors, outside autocast, tracing (fvcore's FLOP counter and TorchScript export
trace the plain ops) and torch.compile (Inductor fuses the plain ops itself). Everything else,
training included, takes the plain path. Both paths compute the same function; results differ by
fp32 summation order only (relative ~1e-6).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from timm.layers import Mlp
from torch import nn

__all__ = ["FusedMlp", "conv_norm_act", "linear_act"]

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: torch.Tensor, *modules: nn.Module) -> bool:
    # first: under torch.compile the kernels' folded weights are no graph constants, and Inductor
    # fuses the plain ops itself
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if not _HAS_ONEDNN or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for m in modules for p in m.parameters())


def linear_act(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, followed by exact (erf) GELU if ``gelu``."""
    if _use_onednn(x, layer):
        attr = "gelu" if gelu else "none"
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, attr, [], "none")
    x = layer(x)
    return F.gelu(x) if gelu else x


def _frozen_affine(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(scale, shift) of a BatchNorm that currently applies a fixed affine map, else None."""
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        return scale, norm.bias - norm.running_mean * scale
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.affine:
        if norm.running_var is None:
            return None
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        return scale, norm.bias - norm.running_mean * scale
    return None


def conv_norm_act(
    x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module, gelu: bool = False
) -> torch.Tensor:
    """``norm(conv(x))``, followed by exact GELU if ``gelu``; a frozen norm is folded into the
    convolution on the fused path."""
    affine = _frozen_affine(norm) if _use_onednn(x, conv, norm) else None
    if affine is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        x = norm(conv(x))
        return F.gelu(x) if gelu else x
    scale, shift = affine
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else shift + conv.bias * scale
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "gelu" if gelu else "none", [], "none",
    )


class FusedMlp(Mlp):
    """timm's ``Mlp`` (fc1 -> GELU -> fc2; same parameters and state-dict keys) that runs its two
    GEMMs through :func:`linear_act` when dropout is off and there is no inner norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (
            not isinstance(self.act, nn.GELU)
            or self.act.approximate != "none"
            or not isinstance(self.norm, nn.Identity)
            or (self.training and (self.drop1.p > 0 or self.drop2.p > 0))
        )
        if plain or not isinstance(self.fc1, nn.Linear) or not isinstance(self.fc2, nn.Linear):
            return super().forward(x)
        return linear_act(linear_act(x, self.fc1, gelu=True), self.fc2)
