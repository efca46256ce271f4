"""Additive attention masks for (shifted) window attention on zero-padded maps (Swin-style).

The map (H, W) is zero-padded on the bottom/right to multiples of the window, then, for shifted
windows, rolled by (-shift, -shift) before ``window_partition``. A query may attend to a key of its
window only if the key is a real (not padded) token and, after the roll, comes from the same
region of the map as the query (Swin's shifted-window mask).
"""

from typing import Optional, Tuple

import torch

from .windows import window_partition

__all__ = ["MASKED", "window_attention_mask"]

# Added to masked logits. Finite, so that a padded query with no visible key (its output is
# cropped anyway) gets uniform weights instead of NaN; exp(-1e4) is 0 in fp32, fp16 and bf16.
MASKED = -1e4


def window_attention_mask(
    size: Tuple[int, int],
    window_size: int,
    shift: int = 0,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Optional[torch.Tensor]:
    """Mask for attention inside the windows of an (H, W) map, padded and rolled as above.

    Returns:
        (num_windows, ws*ws, ws*ws) with 0 where query i may see key j and ``MASKED`` elsewhere,
        windows in ``window_partition`` order; None when no key is masked (no padding, no shift).
    """
    height, width = size
    if not 0 <= shift < window_size:
        raise ValueError(
            f"shift={shift}: expected 0 <= shift < window_size={window_size}"
        )
    padded_h, padded_w = (
        -(-height // window_size) * window_size,
        -(-width // window_size) * window_size,
    )
    if shift == 0 and (padded_h, padded_w) == (height, width):
        return None
    region = torch.zeros(padded_h, padded_w, device=device)
    if shift:
        bounds = (
            slice(0, -window_size),
            slice(-window_size, -shift),
            slice(-shift, None),
        )
        for i, rows in enumerate(bounds):
            for j, cols in enumerate(bounds):
                region[rows, cols] = 3 * i + j
    valid = torch.zeros(padded_h, padded_w, dtype=torch.bool, device=device)
    valid[:height, :width] = True
    valid = torch.roll(valid, (-shift, -shift), dims=(0, 1))
    # padded keys get their own label, which no query matches
    key_label = torch.where(valid, region, torch.full_like(region, -1.0))
    queries, _ = window_partition(region[None, :, :, None], window_size)
    keys, _ = window_partition(key_label[None, :, :, None], window_size)
    visible = queries == keys.transpose(1, 2)  # (num_windows, ws*ws, ws*ws)
    mask = torch.zeros(visible.shape, device=device, dtype=dtype)
    return mask.masked_fill_(~visible, MASKED)
