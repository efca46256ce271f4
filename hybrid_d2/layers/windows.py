"""Non-overlapping window helpers shared by window-attention backbones (Swin-style).

Feature maps are channels-last, (B, H, W, C). Maps whose size is not a multiple of the window are
zero-padded on the bottom/right before partitioning and cropped back after the reverse.
"""

from typing import Tuple

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map on the bottom/right to make H and W multiples of ``multiple``."""
    height, width = x.shape[1:3]
    pad_h = -height % multiple
    pad_w = -width % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def window_partition(
    x: torch.Tensor, window_size: int
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Split a (B, H, W, C) map into windows, padding it first if needed.

    Returns:
        windows of shape (B * num_windows, window_size**2, C), batch-major and row-major within an
        image, and the padded size (Hp, Wp) that ``window_reverse`` needs.
    """
    x = pad_to_multiple(x, window_size)
    batch, height, width, channels = x.shape
    x = x.view(
        batch,
        height // window_size,
        window_size,
        width // window_size,
        window_size,
        channels,
    )
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(
        -1, window_size * window_size, channels
    )
    return windows, (height, width)


def window_reverse(
    windows: torch.Tensor,
    window_size: int,
    padded_size: Tuple[int, int],
    size: Tuple[int, int],
) -> torch.Tensor:
    """Inverse of ``window_partition``: reassemble a (B, Hp, Wp, C) map and crop it to ``size``."""
    padded_h, padded_w = padded_size
    channels = windows.shape[-1]
    x = windows.view(
        -1,
        padded_h // window_size,
        padded_w // window_size,
        window_size,
        window_size,
        channels,
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, padded_h, padded_w, channels)
    height, width = size
    if (height, width) != (padded_h, padded_w):
        x = x[:, :height, :width].contiguous()
    return x


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into a ((2*ws-1)**2, heads) relative position bias table for every token pair.

    Returns a (ws*ws, ws*ws) long tensor; entry (i, j) encodes the offset of token i from token j.
    """
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(window_size), torch.arange(window_size), indexing="ij"
        )
    ).flatten(
        1
    )  # (2, ws*ws)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (
        window_size - 1
    )
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]
