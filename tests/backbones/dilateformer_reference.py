"""The official ``nn.Unfold`` formulation of DilateFormer's MSDA (design note §2.6, §6 #8), kept
outside the library as the reference for tests/backbones/test_dilateformer.py and for
tools/benchmark.py backbones. Written from the design note's description, not copied."""

from typing import Sequence

import torch
from torch import nn


def unfold_dilated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, dilations: Sequence[int]
) -> torch.Tensor:
    """(B, C, H, W) q, k, v -> (B, H, W, C): per dilation group, unfold the 3x3 dilated, zero-padded
    neighbourhood of every key and value (9 copies), softmax(q.k / sqrt(d)) over the 9, times v."""
    batch, channels, height, width = q.shape
    groups = len(dilations)
    heads, head_dim = num_heads // groups, channels // num_heads
    outputs = []
    for g, dilation in enumerate(dilations):
        group = slice(g * channels // groups, (g + 1) * channels // groups)
        unfold = nn.Unfold(kernel_size=3, dilation=dilation, padding=dilation, stride=1)
        query = (
            q[:, group].reshape(batch, heads, head_dim, 1, height * width).permute(0, 1, 4, 3, 2)
        )
        keys = unfold(k[:, group]).reshape(batch, heads, head_dim, 9, height * width)
        keys = keys.permute(0, 1, 4, 2, 3)  # (B, heads, HW, head_dim, 9)
        weights = (query @ keys * head_dim**-0.5).softmax(dim=-1)  # (B, heads, HW, 1, 9)
        values = unfold(v[:, group]).reshape(batch, heads, head_dim, 9, height * width)
        values = values.permute(0, 1, 4, 3, 2)  # (B, heads, HW, 9, head_dim)
        out = (weights @ values).reshape(batch, heads, height, width, head_dim)
        outputs.append(out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1))
    return torch.cat(outputs, dim=-1)


class UnfoldMultiDilateAttention(nn.Module):
    """Drop-in for ``MultiDilateAttention`` (same parameters) computing MSDA the official way:
    1x1 conv qkv on the channels-first map, unfold attention, Linear projection."""

    def __init__(self, attention: nn.Module, dilations: Sequence[int] = (1, 2, 3)):
        super().__init__()
        self.num_heads = attention.num_heads
        self.dilations = tuple(dilations)
        self.qkv = attention.qkv
        self.proj = attention.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        qkv = self.qkv(x.permute(0, 3, 1, 2))
        q, k, v = qkv.chunk(3, dim=1)
        return self.proj(unfold_dilated_attention(q, k, v, self.num_heads, self.dilations))


def use_unfold_attention(network: nn.Module) -> nn.Module:
    """Swap every MSDA module of a DilateFormer network for the unfold reference, in place."""
    for stage in network.stages[:2]:
        for block in stage.blocks:
            block.attn = UnfoldMultiDilateAttention(block.attn)
    return network
