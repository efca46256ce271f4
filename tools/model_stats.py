#!/usr/bin/env python
"""Parameter (and optionally FLOP) counts of the models of some configs, as a markdown table.

    python tools/model_stats.py configs/mixformer_b*_mask_rcnn_1x.yaml
    python tools/model_stats.py --flops --height 800 --width 1280 configs/mixformer_b1_mask_rcnn_1x.yaml

Counts come from fvcore. FLOPs are fvcore's (one multiply-add = one FLOP, as in the papers' tables),
with hybrid_d2's handles for the attention ops fvcore does not know, of the backbone alone (``backbone.bottom_up``) on one image of the given size.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import argparse
import os
import sys
from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from fvcore.nn import parameter_count

from hybrid_d2 import get_config
from hybrid_d2.layers import flop_count_analysis


def load_config(path: str, opts: List[str] = ()) -> CfgNode:
    return get_config(path, ["MODEL.DEVICE", "cpu", *opts])


def model_stats(cfg: CfgNode, flops_size=None) -> Dict[str, float]:
    """Detector and backbone parameter counts; backbone GFLOPs at ``flops_size`` = (H, W)."""
    model = build_model(cfg).eval()
    counts = parameter_count(model)
    bottom_up = getattr(model.backbone, "bottom_up", model.backbone)
    stats = {
        "params": counts[""],
        "backbone_params": parameter_count(bottom_up)[""],
    }
    if flops_size:
        image = torch.zeros(1, 3, *flops_size)
        with torch.no_grad():
            analysis = flop_count_analysis(bottom_up, image).unsupported_ops_warnings(False)
            stats["backbone_gflops"] = analysis.total() / 1e9
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--flops", action="store_true", help="also count backbone FLOPs")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    flops_size = (args.height, args.width) if args.flops else None
    header = "| config | detector params | backbone params |"
    header += f" backbone GFLOPs @{args.height}x{args.width} |" if args.flops else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for path in args.configs:
        stats = model_stats(load_config(path), flops_size)
        row = f"| {os.path.basename(path)} | {stats['params']:,} | {stats['backbone_params']:,} |"
        row += f" {stats['backbone_gflops']:.1f} |" if args.flops else ""
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
