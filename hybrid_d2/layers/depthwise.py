"""Depth-wise convolution with a fast CPU backward, computing exactly ``nn.Conv2d``'s function.

PyTorch's CPU depth-wise convolution (oneDNN) is fast forward on undilated kernels, but its
backward costs several times its forward, and a *dilated* depth-wise convolution is slow both
ways: 90% of a DMFormer-S training step went to the backward of its 5x5 and 7x7 dilated
branches (docs/benchmarks.md, "Where the time goes"). :class:`DepthwiseConv2d` keeps
``nn.Conv2d``'s parameters, state dict and module name, and on CPU computes the same convolution
as two fast operations:

* a dilation d becomes none by *space-to-batch*: the d x d sub-grids of the (zero-padded) map are
  moved into the batch and convolved with the undilated kernel (a dilated convolution reads only
  one sub-grid for each output pixel), then moved back;
* the backward runs on channels-last sub-grids, where oneDNN's depth-wise kernels are 1.5-4x
  faster than on channels-first maps (the layout change rides on the sub-grid copy, so it costs
  no extra pass): the input gradient is the output gradient convolved with the kernel turned by
  180 degrees, the kernel gradient is PyTorch's own ``torch.nn.grad.conv2d_weight``. Autograd
  saves the input itself, as for ``nn.Conv2d``; the sub-grids are rebuilt in the backward.

Sums are taken in another order than oneDNN's, so results agree to float32 round-off. CUDA,
TorchScript tracing (fvcore's FLOP counting) and any layout other than odd kernels with "same"
padding and stride 1 take ``F.conv2d`` as it is.
"""

from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DepthwiseConv2d", "depthwise_conv2d"]


class _DepthwiseConv(torch.autograd.Function):
    """Stride-1, odd-kernel depth-wise convolution with "same" zero padding and dilation d, run
    on the d x d sub-grids; its backward runs on channels-last sub-grids (faster than oneDNN's
    depth-wise backward on the channels-first map). It saves the input as given, not its
    sub-grids, so that training keeps no more than ``nn.Conv2d`` does (the sub-grids are rebuilt
    in the backward)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], d: int
    ):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.dilation = bias is not None, d
        pad, layout = weight.shape[-1] // 2, _layout(x)
        out = F.conv2d(
            _to_subgrids(x, d, layout), weight, bias, padding=pad, groups=x.shape[1]
        )
        return _from_subgrids(out, d, x.shape[-2:], layout)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        d, pad = ctx.dilation, weight.shape[-1] // 2
        grad_out = _to_subgrids(grad_out, d, torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # the transpose of a stride-1 "same" correlation: correlate with the turned kernel
            turned = weight.flip(-1, -2).contiguous(memory_format=torch.channels_last)
            grad_x = F.conv2d(grad_out, turned, padding=pad, groups=x.shape[1])
            grad_x = _from_subgrids(grad_x, d, x.shape[-2:], _layout(x))
        if ctx.needs_input_grad[1]:
            subgrids = _to_subgrids(x, d, torch.channels_last)
            grad_weight = torch.nn.grad.conv2d_weight(
                subgrids, weight.shape, grad_out, padding=pad, groups=x.shape[1]
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format a (B, C, H, W) map is laid out in: channels-last or channels-first."""
    channels_last = (
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    )
    return torch.channels_last if channels_last else torch.contiguous_format


def _to_subgrids(
    x: torch.Tensor, dilation: int, memory_format: torch.memory_format
) -> torch.Tensor:
    """(B, C, H, W) -> (B * d * d, C, ceil(H / d), ceil(W / d)): the d x d sub-grids of the map,
    zero-padded on the bottom/right to the same size, as batch entries (the map itself for d=1),
    laid out in ``memory_format``. One pass over the map: each sub-grid is copied into its place
    and only its padding is zeroed (a zero-padded copy first would cost a second pass)."""
    if dilation == 1:
        return x.contiguous(memory_format=memory_format)
    batch, channels, height, width = x.shape
    rows, cols = -(-height // dilation), -(-width // dilation)
    grids = torch.empty(
        (batch * dilation * dilation, channels, rows, cols),
        dtype=x.dtype,
        device=x.device,
        memory_format=memory_format,
    )
    for (i, j), grid in _subgrid_views(grids, dilation):
        part = x[:, :, i::dilation, j::dilation]
        part_rows, part_cols = part.shape[-2:]
        grid[..., :part_rows, :part_cols].copy_(part)
        grid[..., part_rows:, :].zero_()
        grid[..., :part_rows, part_cols:].zero_()
    return grids


def _from_subgrids(
    grids: torch.Tensor,
    dilation: int,
    size: Tuple[int, int],
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """Inverse of :func:`_to_subgrids`: the (B, C, *size) map laid out in ``memory_format``,
    each sub-grid copied back into its place in one pass (the padding dropped)."""
    if dilation == 1:
        return grids.contiguous(memory_format=memory_format)
    batch = grids.shape[0] // (dilation * dilation)
    out = torch.empty(
        (batch, grids.shape[1], *size),
        dtype=grids.dtype,
        device=grids.device,
        memory_format=memory_format,
    )
    for (i, j), grid in _subgrid_views(grids, dilation):
        part = out[:, :, i::dilation, j::dilation]
        part.copy_(grid[..., : part.shape[-2], : part.shape[-1]])
    return out


def _subgrid_views(
    grids: torch.Tensor, dilation: int
) -> Iterator[Tuple[Tuple[int, int], torch.Tensor]]:
    """((i, j), the (B, C, rows, cols) view of sub-grid (i, j)) of a (B * d * d, C, rows, cols)
    tensor whose batch entries are ordered (sample, i, j)."""
    batch = grids.shape[0] // (dilation * dilation)
    views = grids.view(batch, dilation, dilation, *grids.shape[1:])
    return (
        ((i, j), views[:, i, j]) for i in range(dilation) for j in range(dilation)
    )


def uses_fast_path(
    x: torch.Tensor,
    weight: torch.Tensor,
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    stride: Tuple[int, int],
) -> bool:
    """Whether :func:`depthwise_conv2d` takes the decomposed CPU path for these arguments: CPU,
    not traced, odd square kernel with "same" padding, stride 1, and a kernel of 5 or more or a
    dilation (oneDNN's own 3x3 undilated backward is the faster one), on sub-grids of more than
    one pixel (where the layout copies cost more than oneDNN's own dilated kernel: 4x its time on
    a 2048-channel 3x2 map)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or x.device.type != "cpu":
        return False
    kernel = weight.shape[-2:]
    subgrid_pixels = -(-x.shape[-2] // dilation[0]) * -(-x.shape[-1] // dilation[0])
    return (
        (kernel[0] >= 5 or dilation[0] > 1)
        and subgrid_pixels > 1
        and kernel[0] == kernel[1]
        and kernel[0] % 2 == 1
        and weight.shape[0] == x.shape[1]
        and weight.shape[1] == 1
        and stride == (1, 1)
        and dilation[0] == dilation[1]
        and padding == (dilation[0] * (kernel[0] // 2),) * 2
    )


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    stride: Tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` for a depth-wise
    ``weight`` (C, 1, k, k); where :func:`uses_fast_path`, computed on sub-grids with a backward
    of forward convolutions (module docstring)."""
    if not uses_fast_path(x, weight, tuple(padding), tuple(dilation), tuple(stride)):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])
    return _DepthwiseConv.apply(x, weight, bias, dilation[0])


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel, padding=dilation * (kernel // 2),
    dilation=dilation, groups=channels)``: the same module (parameters, state dict, repr), whose
    CPU forward and backward take :func:`depthwise_conv2d`'s faster route."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
    ):
        super().__init__(
            channels,
            channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=channels,
            bias=bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(
            x, self.weight, self.bias, self.padding, self.dilation, self.stride
        )
