"""The dynamic residual convolution one sample at a time with plain convolutions (paper Eq. 1-2),
kept outside the library as the reference for tests/backbones/test_dmf.py and for
tools/benchmark.py backbones (the usual way to write a per-sample kernel, before batching it into
one grouped convolution)."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_d2.backbones.dmf import DYNAMIC_SCALE, DynamicResidualConv2d


def per_sample_loop(
    conv: DynamicResidualConv2d, x: torch.Tensor, token: torch.Tensor
) -> torch.Tensor:
    """W_b = static_weight + 0.1 * sum_k pi_{b,k} weight[k]; one conv2d per sample."""
    scores = conv.Kernel_Attention(x, token)
    outputs = []
    for b in range(x.shape[0]):
        dynamic = (scores[b].view(-1, 1, 1, 1, 1) * conv.weight).sum(0)
        kernel = conv.static_weight + DYNAMIC_SCALE * dynamic
        outputs.append(F.conv2d(x[b : b + 1], kernel, padding=conv.padding, groups=conv.groups))
    return torch.cat(outputs)


def use_per_sample_loop(network: nn.Module) -> None:
    """Make every dynamic residual convolution of ``network`` run ``per_sample_loop``."""
    for conv in network.modules():
        if isinstance(conv, DynamicResidualConv2d):
            conv.forward = functools.partial(per_sample_loop, conv)
