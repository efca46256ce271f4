"""Mode ``dmformer-branches``: DMFormer's dilated depth-wise branches, separate or fused."""

import argparse
from functools import partial
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from hybrid_d2.backbones import D2DMFormer
from hybrid_d2.backbones.dmformer import DIMS, DMA_RATIO, DilatedBranches

from .registry import mode
from .report import Report, Table
from .timing import alternate, inference, spread

LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def train_call(module: nn.Module, inp: torch.Tensor) -> None:
    """Forward and backward of ``module`` on ``inp``."""
    module(inp.requires_grad_()).sum().backward()


def branch_calls(
    channels: int, size: Tuple[int, int], batch: int, train: bool
) -> Dict[str, Callable[[], object]]:
    """``DilatedBranches`` separate and fused (same weights) on each layout of one input."""
    torch.manual_seed(0)
    separate = DilatedBranches(channels, (3, 5, 7), (1, 2, 3), "separate")
    fused = DilatedBranches(channels, (3, 5, 7), (1, 2, 3), "fused")
    fused.load_state_dict(separate.state_dict())
    x = torch.randn(batch, channels, *size)
    calls = {}
    for layout, memory_format in LAYOUTS.items():
        inp = x.contiguous(memory_format=memory_format)
        for name, module in (("separate", separate), ("fused", fused)):
            call = partial(train_call, module, inp) if train else inference(module, inp)
            calls[f"{name} {layout}"] = call
    return calls


def branch_rows(
    title: str, calls: Dict[str, Callable[[], object]], args: argparse.Namespace
) -> List[List[str]]:
    """Table rows of ``calls`` alternating: median and min-max in ms."""
    rows = []
    for name, times in alternate(calls, args.warmup, args.rounds, label=title).items():
        ms = spread(times, 1e3)
        rows.append([title, name, f"{ms['median']:.1f}", f"{ms['min']:.1f}-{ms['max']:.1f}"])
    return rows


@mode("dmformer-branches", width=1216, warmup=1)
def dmformer_branches(args: argparse.Namespace) -> Report:
    """DMFormer's dilated branches, separate or fused.

    DMFormer's three dilated depth-wise branches: separate convs against one fused 19x19 conv.
    For the DMA input of the first block of each stage (r * C channels at stride 4 ... 32 of one
    image), times DilatedBranches in each form and memory format, in inference (no_grad) and in
    training (forward + backward, batch 2 at a quarter of the image area), and the whole
    DMFormer-S backbone in inference with branches="fused" against "separate" (what "auto" runs).
    The variants of one measurement run alternately in one process, one call each per round,
    after the warm-up rounds; the table gives the median over the rounds and the spread (min-max)
    in ms.
    """
    table = Table(["measurement", "variant", "median ms", "min-max ms"])
    for stage, dim in enumerate(DIMS):
        stride = 2 ** (stage + 2)
        size = (-(-args.height // stride), -(-args.width // stride))
        title = f"inference, stage {stage + 1} ({DMA_RATIO * dim}x{size[0]}x{size[1]})"
        table.rows += branch_rows(title, branch_calls(DMA_RATIO * dim, size, 1, False), args)
    for stage in (0, 2):
        stride = 2 ** (stage + 3)  # a quarter of the area: batch 2 of half-size images
        size = (-(-args.height // stride), -(-args.width // stride))
        channels = DMA_RATIO * DIMS[stage]
        title = f"training, stage {stage + 1} (2x{channels}x{size[0]}x{size[1]})"
        table.rows += branch_rows(title, branch_calls(channels, size, 2, True), args)
    torch.manual_seed(0)
    models = {b: D2DMFormer("s", branches=b).eval() for b in ("fused", "separate")}
    models["separate"].load_state_dict(models["fused"].state_dict())
    image = torch.randn(1, 3, args.height, args.width)
    calls = {f"DMFormer-S branches={m}": inference(model, image) for m, model in models.items()}
    table.rows += branch_rows("inference, whole backbone", calls, args)
    return Report(
        settings=f"{args.threads} threads, image {args.height}x{args.width}, {args.warmup} "
        f"warm-up + {args.rounds} rounds",
        tables=[table],
    )
