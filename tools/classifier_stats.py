#!/usr/bin/env python
"""Parameters and FLOPs at 224x224 of the timm ImageNet classifiers, as a markdown table.

    python tools/classifier_stats.py                      # every hybrid_* classifier
    python tools/classifier_stats.py hybrid_dmf_s hybrid_mixformer_b4

Counts come from fvcore (1000-class head, eval mode; one multiply-add = one FLOP, with hybrid_d2's
handles for the attention ops fvcore does not know). "GFLOPs" is fvcore's total (norms and pooling
included, as the DilateFormer and DMF papers count); "GMACs" leaves norms and pooling out
(convolutions, linears and attention products only, as the MixFormer, DualFormer and DMFormer
derivations in the design notes count).
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import argparse
import sys
from typing import Dict, List, Optional

import timm
import torch
from fvcore.nn import parameter_count

import hybrid_d2  # noqa: F401  (registers the classifiers)
from hybrid_d2.layers import flop_count_analysis


def classifier_stats(name: str) -> Dict[str, float]:
    """Parameters, GFLOPs and GMACs (no norms, no pooling) at 224x224 of a registered classifier."""
    model = timm.create_model(name).eval()
    analysis = flop_count_analysis(model, torch.zeros(1, 3, 224, 224))
    by_operator = analysis.unsupported_ops_warnings(False).by_operator()
    macs = sum(v for op, v in by_operator.items() if "norm" not in op and "pool" not in op)
    return {
        "params": parameter_count(model)[""],
        "gflops": analysis.total() / 1e9,
        "gmacs": macs / 1e9,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="timm names (default: every hybrid_* model)")
    args = parser.parse_args(argv)
    print("| model | params | GFLOPs @224 | GMACs @224 |\n|---|---|---|---|")
    for name in args.names or timm.list_models("hybrid_*"):
        stats = classifier_stats(name)
        row = f"| {name} | {stats['params']:,} | {stats['gflops']:.3f} | {stats['gmacs']:.3f} |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
