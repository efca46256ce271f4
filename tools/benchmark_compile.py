#!/usr/bin/env python
"""Eager vs ``torch.compile`` inference latency of backbones at detection resolution (not a test).

    PYTHONPATH=. python tools/benchmark_compile.py            # CPU, 2 threads, 1x3x800x1216
    PYTHONPATH=. python tools/benchmark_compile.py --models "ResNet-50 (Detectron2)" --rounds 9

Models: MixFormer-B1 (``D2MixFormer("b1")``, the shipped configs' defaults), DilateFormer-S with
stage-3 "mixed" attention (window 7, FrozenBN) and Detectron2's ResNet-50 (``build_resnet_backbone``,
default config, outputs res2-res5); the backbone alone, batch 1, eval mode, ``torch.no_grad``.

Ways of running each (``--variants``):

* ``eager``: plain eager PyTorch;
* ``compiled``: ``torch.compile(model, fullgraph=True)``, Inductor's defaults;
* ``compiled, freezing``: the same with ``options={"freezing": True}``: the weights become graph
  constants, so Inductor folds BatchNorms into convolutions and runs Linear/conv through oneDNN with
  their pointwise epilogues (bias, GELU) in the same kernel.

Every (model, variant) pair is built in this one process, compiled at the benchmark size (the first
call, reported as compile time, then one more warm-up call), and checked against eager (largest
absolute difference over the outputs, relative to the largest output). Then ``--rounds`` rounds
each run every pair once, in turn, so that a change in the machine's load reaches every pair alike;
the table gives the median per image, the spread (min-max) and ratios to the same model's eager
median and to compiled ResNet-50's median. Recompilation during the timed rounds is an error.
"""

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

REFERENCE_MODEL = "ResNet-50 (Detectron2)"
VARIANTS = ("eager", "compiled", "compiled, freezing")


def _mixformer_b1():
    from hybrid_d2.backbones import D2MixFormer

    return D2MixFormer("b1")


def _dilateformer_s_mixed():
    from hybrid_d2.backbones import D2DilateFormer

    return D2DilateFormer("small", stage3_attention="mixed", window_size=7)


def _resnet50():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()  # ResNet-50, FrozenBN, stem frozen; outputs as under an FPN
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


MODELS: Dict[str, Callable] = {
    "MixFormer-B1": _mixformer_b1,
    "DilateFormer-S mixed": _dilateformer_s_mixed,
    REFERENCE_MODEL: _resnet50,
}


class Runner:
    """One (model, variant) pair: a callable that runs the model once on the benchmark image."""

    def __init__(self, name: str, variant: str, model, image):
        import torch

        self.name, self.variant, self.image = name, variant, image
        if variant.startswith("compiled"):
            options = {"freezing": True} if variant == "compiled, freezing" else None
            # a copy per compiled variant, so that freezing's constants belong to one model
            self.model = torch.compile(copy.deepcopy(model), fullgraph=True, options=options)
        else:
            self.model = model
        self.times: List[float] = []
        self.compile_s: Optional[float] = None

    def __call__(self):
        import torch

        with torch.no_grad():
            return self.model(self.image)

    def timed(self) -> float:
        start = time.perf_counter()
        self()
        return time.perf_counter() - start


def _max_relative_difference(outputs: dict, reference: dict) -> float:
    return max(
        ((outputs[k] - reference[k]).abs().max() / reference[k].abs().max()).item()
        for k in reference
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and OpenMP)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of every pair")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")
    # before torch is imported, so that OpenMP (Inductor's kernels) starts with this many threads
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch
    import torch._dynamo

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image = torch.randn(1, 3, args.height, args.width)
    print(
        f"CPU, {args.threads} threads, 1x3x{args.height}x{args.width}, {args.rounds} rounds, "
        f"torch {torch.__version__}",
        flush=True,
    )

    runners: List[Runner] = []
    for name in args.models:
        model = MODELS[name]().eval()
        eager = None
        for variant in args.variants:
            runner = Runner(name, variant, model, image)
            start = time.perf_counter()
            outputs = runner()  # compiles a compiled variant
            first_s = time.perf_counter() - start
            runner()
            if eager is None:
                eager = Runner(name, "eager", model, image)()
            difference = _max_relative_difference(outputs, eager)
            if variant.startswith("compiled"):
                runner.compile_s = first_s
            print(
                f"{name}, {variant}: first call {first_s:.1f} s, largest difference from eager "
                f"{difference:.1e} (relative to the largest output)",
                flush=True,
            )
            runners.append(runner)

    torch._dynamo.config.error_on_recompile = True
    for _ in range(args.rounds):
        for runner in runners:
            runner.times.append(runner.timed())

    medians = {(r.name, r.variant): statistics.median(r.times) for r in runners}
    reference = medians.get((REFERENCE_MODEL, "compiled"))
    print(
        "\n| model | variant | median ms | min-max ms | x eager | x compiled ResNet-50 "
        "| compile s |\n|---|---|---|---|---|---|---|"
    )
    for r in runners:
        median = medians[(r.name, r.variant)]
        eager = medians.get((r.name, "eager"))
        print(
            f"| {r.name} | {r.variant} | {median * 1e3:.0f} | {min(r.times) * 1e3:.0f}-"
            f"{max(r.times) * 1e3:.0f} | "
            + (f"{median / eager:.2f}" if eager else "-")
            + " | "
            + (f"{median / reference:.2f}" if reference else "-")
            + " | "
            + (f"{r.compile_s:.0f}" if r.compile_s is not None else "-")
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
