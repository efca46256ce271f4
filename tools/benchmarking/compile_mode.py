"""Mode ``compile``: backbones run eagerly against torch.compile."""

import argparse
import copy
import time
from functools import partial
from typing import Callable, Dict

import torch
from torch import nn

from hybrid_d2.backbones import D2MixFormer

from .backbones import RESNET50, dilateformer_s, resnet50
from .registry import mode, models_option, option
from .report import Report, Table
from .timing import alternate, inference, progress, spread

COMPILE_MODELS: Dict[str, Callable[[], nn.Module]] = {
    "MixFormer-B1": partial(D2MixFormer, "b1"),
    "DilateFormer-S mixed": partial(dilateformer_s, "mixed"),
    RESNET50: resnet50,
}
VARIANTS = ("eager", "compiled", "compiled, freezing")


def compiled(model: nn.Module, variant: str) -> nn.Module:
    """``model`` run the ``variant`` way; a copy per compiled variant, so that freezing's
    constants belong to one model."""
    if variant == "eager":
        return model
    options = {"freezing": True} if variant == "compiled, freezing" else None
    return torch.compile(copy.deepcopy(model), fullgraph=True, options=options)


def relative_difference(
    outputs: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]
) -> float:
    """Largest absolute difference over the outputs, relative to the largest output."""
    return max(
        ((outputs[k] - reference[k]).abs().max() / reference[k].abs().max()).item()
        for k in reference
    )


@mode(
    "compile",
    width=1216,
    warmup=1,
    options=[
        models_option(COMPILE_MODELS),
        option("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS)),
    ],
)
def compile_mode(args: argparse.Namespace) -> Report:
    """Eager against torch.compile.

    Inference latency of backbones at detection resolution. Models: MixFormer-B1
    (D2MixFormer("b1"), the shipped configs' defaults), DilateFormer-S with stage-3 "mixed"
    attention (window 7, FrozenBN) and Detectron2's ResNet-50 (build_resnet_backbone, default
    config, outputs res2-res5); the backbone alone, batch 1, eval mode, torch.no_grad.

    Ways of running each (--variants):

    * eager: plain eager PyTorch;
    * compiled: torch.compile(model, fullgraph=True), Inductor's defaults;
    * compiled, freezing: the same with options={"freezing": True}: the weights become graph
      constants, so Inductor folds BatchNorms into convolutions and runs Linear/conv through
      oneDNN with their pointwise epilogues (bias, GELU) in the same kernel.

    Every (model, variant) pair is built in this one process, compiled at the benchmark size (the
    first call, reported as compile time, then --warmup more calls), and checked against eager
    (largest absolute difference over the outputs, relative to the largest output). Then --rounds
    rounds each run every pair once, in turn, so that a change in the machine's load reaches every
    pair alike; the table gives the median per image, the spread (min-max) and ratios to the same
    model's eager median and to compiled ResNet-50's median. Recompilation during the timed rounds
    is an error.
    """
    torch.manual_seed(0)
    image = torch.randn(1, 3, args.height, args.width)
    calls, compile_s, remarks = {}, {}, []
    for name in args.models:
        model = COMPILE_MODELS[name]().eval()
        eager = None
        for variant in args.variants:
            run = inference(compiled(model, variant), image)
            start = time.perf_counter()
            outputs = run()  # compiles a compiled variant
            first_s = time.perf_counter() - start
            for _ in range(args.warmup):
                run()
            if eager is None:
                eager = inference(model, image)()
            if variant != "eager":
                compile_s[f"{name}, {variant}"] = first_s
            remarks.append(
                f"{name}, {variant}: first call {first_s:.1f} s, largest difference from eager "
                f"{relative_difference(outputs, eager):.1e} (relative to the largest output)"
            )
            progress(remarks[-1])
            calls[f"{name}, {variant}"] = run
    with torch._dynamo.config.patch(error_on_recompile=True):
        times = alternate(calls, 0, args.rounds, label="infer")
    ms = {key: spread(t, 1e3) for key, t in times.items()}
    reference = ms.get(f"{RESNET50}, compiled")
    table = Table([
        "model", "variant", "median ms", "min-max ms", "x eager", "x compiled ResNet-50",
        "compile s",
    ])  # fmt: skip
    for name in args.models:
        eager = ms.get(f"{name}, eager")
        for variant in args.variants:
            key, median = f"{name}, {variant}", ms[f"{name}, {variant}"]["median"]
            table.rows.append([
                name, variant, f"{median:.0f}", f"{ms[key]['min']:.0f}-{ms[key]['max']:.0f}",
                f"{median / eager['median']:.2f}" if eager else "-",
                f"{median / reference['median']:.2f}" if reference else "-",
                f"{compile_s[key]:.0f}" if key in compile_s else "-",
            ])  # fmt: skip
    return Report(
        settings=f"CPU, {args.threads} threads, 1x3x{args.height}x{args.width}, "
        f"{args.warmup} warm-up call(s) after compiling, {args.rounds} rounds",
        tables=[table],
        remarks=remarks,
    )
