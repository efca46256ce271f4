"""The stage every family with stages is built from, and activation checkpointing."""

import contextlib
from typing import Iterable, Iterator, Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "Stage",
    "checkpointed",
    "running_stats_frozen",
    "to_channels_first",
    "to_channels_last",
]


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W), a view."""
    return x.permute(0, 3, 1, 2)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C), a view."""
    return x.permute(0, 2, 3, 1)


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Let ``module``'s BatchNorms normalise with batch statistics without updating their running
    statistics (momentum 0; num_batches_tracked restored): a checkpointed block's recomputation.
    """
    norms = [
        m
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def checkpointed(block: nn.Module, *inputs: torch.Tensor):
    """``block(*inputs)`` with its activations recomputed in the backward pass instead of kept;
    the recomputation leaves BatchNorm running statistics alone, so that they are updated once
    per step, as without checkpointing."""
    return torch.utils.checkpoint.checkpoint(
        block,
        *inputs,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), running_stats_frozen(block)),
    )


class Stage(nn.Module):
    """Blocks at one resolution, then (except in the last stage) the downsampling that feeds the
    next stage.

    ``forward`` returns the stage output, read after the last block, and its downsampled version
    (None without ``downsample``). With ``use_checkpoint``, each block is recomputed in the
    backward pass while the stage is in training mode (a frozen stage is in eval mode).
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        downsample: Optional[nn.Module] = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        for block in self.blocks:
            x = (
                checkpointed(block, x)
                if self.use_checkpoint and self.training
                else block(x)
            )
        return x, None if self.downsample is None else self.downsample(x)
