#!/usr/bin/env python
"""DMFormer's three dilated depth-wise branches: separate convs vs one fused 19x19 conv (not a test).

    PYTHONPATH=. python tools/benchmark_dmformer_branches.py                 # 2 threads, 800x1216
    PYTHONPATH=. python tools/benchmark_dmformer_branches.py --threads 1 --height 512 --width 512

For the DMA input of the first block of each stage (r * C channels at stride 4 ... 32 of one
image), times ``DilatedBranches`` in each form and memory format, in inference (``no_grad``) and in
training (forward + backward, batch 2 at a quarter of the image area), and the whole DMFormer-S
backbone in inference with ``branches="auto"`` vs ``"separate"``. The variants of one measurement
run alternately in one process, one call each per round, after one warm-up round; the table gives
the median over the rounds and the spread (min-max) in ms.
"""

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from hybrid_d2.backbones.dmformer import DMA_RATIO, DIMS, D2DMFormer, DilatedBranches

LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def alternate(calls: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, List[float]]:
    """Run every call once per round, in turn, after one warm-up round; times in ms."""
    times = {name: [] for name in calls}
    for i in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def report(title: str, times: Dict[str, List[float]]) -> None:
    for name, values in times.items():
        print(
            f"| {title} | {name} | {statistics.median(values):.1f} | "
            f"{min(values):.1f}-{max(values):.1f} |",
            flush=True,
        )


def branch_calls(channels: int, size: tuple, batch: int, train: bool) -> Dict[str, Callable]:
    torch.manual_seed(0)
    separate = DilatedBranches(channels, (3, 5, 7), (1, 2, 3), "separate")
    fused = DilatedBranches(channels, (3, 5, 7), (1, 2, 3), "fused")
    fused.load_state_dict(separate.state_dict())
    x = torch.randn(batch, channels, *size)
    calls = {}
    for layout, memory_format in LAYOUTS.items():
        inp = x.contiguous(memory_format=memory_format)
        for mode, module in (("separate", separate), ("fused", fused)):

            def call(module=module, inp=inp):
                if train:
                    module(inp.requires_grad_()).sum().backward()
                else:
                    with torch.no_grad():
                        module(inp)

            calls[f"{mode} {layout}"] = call
    return calls


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, image {args.height}x{args.width}, {args.rounds} rounds, torch {torch.__version__}\n")
    print("| measurement | variant | median ms | min-max ms |")
    print("|---|---|---|---|")
    for stage, dim in enumerate(DIMS):
        stride = 2 ** (stage + 2)
        size = (-(-args.height // stride), -(-args.width // stride))
        title = f"inference, stage {stage + 1} ({DMA_RATIO * dim}x{size[0]}x{size[1]})"
        report(title, alternate(branch_calls(DMA_RATIO * dim, size, 1, False), args.rounds))
    for stage in (0, 2):
        stride = 2 ** (stage + 3)  # a quarter of the area: batch 2 of half-size images
        size = (-(-args.height // stride), -(-args.width // stride))
        channels = DMA_RATIO * DIMS[stage]
        title = f"training, stage {stage + 1} (2x{channels}x{size[0]}x{size[1]})"
        report(title, alternate(branch_calls(channels, size, 2, True), args.rounds))

    torch.manual_seed(0)
    models = {mode: D2DMFormer("s", branches=mode).eval() for mode in ("auto", "separate")}
    models["separate"].load_state_dict(models["auto"].state_dict())
    image = torch.randn(1, 3, args.height, args.width)

    def infer(model):
        with torch.no_grad():
            model(image)

    calls = {f"DMFormer-S branches={mode}": (lambda m=m: infer(m)) for mode, m in models.items()}
    report("inference, whole backbone", alternate(calls, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
