"""A guard against an upstream CPU bfloat16 bug on maps a few pixels wide (docs/known_issues.md).

On CPUs with AMX-BF16, oneDNN's bfloat16 convolution (CPU autocast, or a bfloat16 module) now
and then returns NaN from finite input for a 3x3 stride-2 convolution whose output has a side of
1, depending on which shapes ran before (PyTorch 2.14.1; reproduced in plain PyTorch by
``tests/test_upstream_bf16.py``). Every res5 of an input 32 pixels wide goes through such a
downsampler. ``SmallMapSafeConv2d`` computes those few outputs in float32 instead.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SMALL_MAP_SIDE", "SmallMapSafeConv2d", "cpu_bfloat16_in_use"]

# Outputs with a side at most this many pixels run in float32 under CPU bfloat16.
SMALL_MAP_SIDE = 2


def cpu_bfloat16_in_use(x: torch.Tensor) -> bool:
    """Whether a CPU op on ``x`` computes in bfloat16 (a bfloat16 tensor, or CPU autocast)."""
    if x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16:
        return True
    return (
        torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class SmallMapSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that computes in float32, and returns
    bfloat16, when CPU bfloat16 would produce a map with a side of at most SMALL_MAP_SIDE.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_bfloat16_in_use(x) or min(self.output_size(x)) > SMALL_MAP_SIDE:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast("cpu", enabled=False):
            out = F.conv2d(x.float(), self.weight.float(), bias, self.stride, self.padding,
                           self.dilation, self.groups)  # fmt: skip
        return out.to(torch.bfloat16)

    def output_size(self, x: torch.Tensor) -> tuple:
        """(height, width) of the output for input ``x``."""
        return tuple(
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        )
