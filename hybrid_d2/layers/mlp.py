"""The Transformer feed-forward network, Linear -> GELU -> Linear, with a lighter training step.

Autograd would keep three tensors per MLP for the backward: the input (for ``fc1``'s weight
gradient), the hidden pre-activation (for GELU's) and the GELU output (for ``fc2``'s weight
gradient). The last is a cheap elementwise function of the second, so :func:`gelu_linear` keeps
the pre-activation only and recomputes the GELU in the backward: with a hidden width of ``r * C``,
the activations an MLP keeps drop from ``(1 + 2r) C`` to ``(1 + r) C`` values per token (from 9C
to 5C at ``r = 4``). Same operators, same results (``tests/test_mlp.py``). The same holds for a
convolutional MLP whose GELU feeds a 1x1 convolution (DMFormer's).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["Mlp", "gelu_linear", "gelu_mlp", "pointwise_linear"]


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` on the last dimension; parameter names as timm's ``Mlp``."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.fc1, self.fc2)


def gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``fc2(GELU(fc1(x)))``, the GELU output recomputed in the backward (:func:`gelu_linear`)."""
    return gelu_linear(fc1(x), fc2.weight, fc2.bias)


def gelu_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``linear(GELU(hidden), weight, bias)``: a Linear's ``(out, in)`` weight over the last
    dimension, or a 1x1 convolution's ``(out, in, 1, 1)`` over dimension 1 of a (B, C, H, W) map.
    When autograd records it in eager mode, it keeps ``hidden`` and recomputes the GELU in the
    backward. Traced, scripted and compiled graphs (export, fvcore's counts, Inductor) see the
    plain operators."""
    records_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not records_backward or _is_traced():
        return pointwise_linear(F.gelu(hidden), weight, bias)
    return _GeluLinear.apply(hidden, weight, bias)


def _is_traced() -> bool:
    """Whether TorchScript or torch.compile is recording the call (custom autograd Functions are
    opaque to the first and need no memory trick under the second)."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
    )


def pointwise_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``F.linear`` for a Linear's 2-D weight, ``F.conv2d`` for a 1x1 convolution's 4-D one."""
    return (F.conv2d if weight.dim() == 4 else F.linear)(x, weight, bias)


class _GeluLinear(torch.autograd.Function):
    """GELU -> Linear (or 1x1 conv) keeping the GELU's input, not its output, for the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias):
        device = hidden.device.type
        if torch.is_autocast_enabled(
            device
        ):  # the casts autocast makes for linear / conv2d
            dtype = torch.get_autocast_dtype(device)
            hidden, weight, bias = (
                None if t is None else t.to(dtype) for t in (hidden, weight, bias)
            )
        with torch.autocast(device, enabled=False):
            out = pointwise_linear(F.gelu(hidden), weight, bias)
        ctx.save_for_backward(hidden, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # autograd casts each gradient to its input's dtype (autocast's fp16/bf16 to fp32)
        hidden, weight = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad
        grad_out = grad_out.to(hidden.dtype)
        with torch.enable_grad():
            hidden = hidden.detach().requires_grad_()
            activation = F.gelu(hidden)  # recomputed: the tensor not kept
        conv = weight.dim() == 4
        grad_hidden = grad_weight = grad_bias = None
        if needs_weight:
            grad_weight = (
                torch.nn.grad.conv2d_weight(activation, weight.shape, grad_out)
                if conv
                else _rows(grad_out).t().mm(_rows(activation))
            )
        if needs_bias:
            grad_bias = grad_out.sum((0, 2, 3)) if conv else _rows(grad_out).sum(0)
        if needs_hidden:
            grad_activation = (
                torch.nn.grad.conv2d_input(activation.shape, weight, grad_out)
                if conv
                else grad_out.matmul(weight)
            )
            (grad_hidden,) = torch.autograd.grad(activation, hidden, grad_activation)
        return grad_hidden, grad_weight, grad_bias


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])
