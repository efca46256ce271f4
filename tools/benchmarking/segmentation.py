"""Mode ``segmentation``: each family's UperNet segmentor against Detectron2's ResNet-50 under the
same UperNet head."""

import argparse
import os
from typing import Any, Dict, Tuple

from detectron2.config import CfgNode

from hybrid_d2 import get_config

from .detectron import (
    LATENCY_COLUMNS,
    Runner,
    device_settings,
    latency_cells,
    reference_first,
    without_sync_bn,
)
from .paths import REPO_ROOT
from .registry import mode, models_option, option
from .report import Report, Table
from .timing import alternate, progress, spread, synchronizer

SEGMENTOR_REFERENCE = "R50 UperNet"
# The ADE20K config whose head (UperNet + auxiliary FCN, 150 classes) every segmentor shares.
UPERNET_CONFIG = "configs/ade20k/mixformer_b1_upernet_160k.yaml"
# name: (config, overrides). Each family's smallest UperNet paper row; DMF has no ADE20K row, so
# DMF-S gets the same UperNet over its bottom-up network; R50 is Detectron2's ResNet-50.
SEGMENTORS: Dict[str, Tuple[str, Tuple[Any, ...]]] = {
    SEGMENTOR_REFERENCE: (
        UPERNET_CONFIG,
        ("MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", 50,
         "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"]),
    ),  # fmt: skip
    "MixFormer-B1 UperNet": (UPERNET_CONFIG, ()),
    "DilateFormer-S UperNet": ("configs/ade20k/dilateformer_s_upernet_160k.yaml", ()),
    "DualFormer-S UperNet": ("configs/ade20k/dualformer_s_upernet_80k.yaml", ()),
    "DMF-S UperNet": (
        "configs/ade20k/dmformer_s_upernet_160k.yaml",
        ("MODEL.FPN.BOTTOM_UP", "build_dmf_backbone", "MODEL.DMF.VARIANT", "s"),
    ),
    "DMFormer-S UperNet": ("configs/ade20k/dmformer_s_upernet_160k.yaml", ()),
}


def segmentor_config(name: str, device: str) -> CfgNode:
    """The config of a benchmarked segmentor (``segmentation --help``), one-process norms."""
    path, overrides = SEGMENTORS[name]
    cfg = get_config(os.path.join(REPO_ROOT, path), [str(v) for v in overrides])
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    without_sync_bn(cfg)
    return cfg


def measure_segmentors(args: argparse.Namespace, device: str, amp: bool) -> Dict[str, dict]:
    """Inference latency, parameters and GFLOPs of every segmentor on ``device``."""
    runners = {
        name: Runner(segmentor_config(name, device), args, amp, train=False) for name in args.models
    }
    infer = {name: runner.infer for name, runner in runners.items()}
    times = alternate(infer, args.warmup, args.rounds, synchronizer(device), "infer")
    return {
        name: {
            "config": SEGMENTORS[name][0],
            "params_m": sum(p.numel() for p in runner.model.parameters()) / 1e6,
            "latency_s": spread(times[name]),
            "gflops": runner.gflops(),
        }
        for name, runner in runners.items()
    }


def segmentor_table(setting: str, results: Dict[str, dict], reference: str) -> Table:
    """Size, latency, FLOPs and their ratios to ``reference``'s."""
    table = Table(["model", "config", "params (M)", *LATENCY_COLUMNS], title=setting)
    for name, r in results.items():
        overrides = SEGMENTORS[name][1]  # the first names the backbone builder
        config = f"`{os.path.basename(r['config'])}`" + (
            f" with {overrides[1]}" if overrides else ""
        )
        row = [name, config, f"{r['params_m']:.1f}", *latency_cells(r, results[reference])]
        table.rows.append(row)
    return table


@mode(
    "segmentation",
    height=512,
    width=512,
    warmup=1,
    options=[
        models_option(SEGMENTORS),
        option("--no-cuda", action="store_true", help="CPU only even with a GPU"),
    ],
)
def segmentation(args: argparse.Namespace) -> Report:
    """UperNet segmentors against Detectron2's ResNet-50 with the same UperNet head.

    Per-image inference latency of each family's UperNet segmentor: MixFormer-B1, DilateFormer-S,
    DualFormer-S and DMFormer-S as their smallest ADE20K paper configs build them
    (configs/ade20k/; UperNet of 512 channels with its auxiliary FCN head, 150 classes), DMF-S
    (no ADE20K row in its paper) with the DMFormer-S config's UperNet over its bottom-up network,
    and the reference: Detectron2's ResNet-50 (build_resnet_backbone, outputs res2-res5) under the
    MixFormer-B1 config's UperNet. Random weights; SyncBN becomes BatchNorm (one process).
    Inference: eval mode, torch.no_grad, batch 1, one 512x512 noise image through
    SemanticSegmentor's whole inference (normalisation, padding, backbone, decode head, resizing
    of the logits to the image); the auxiliary head does not run. Models alternate within each
    round (round-robin); the tables give the median and the range (min-max) over the rounds.
    GFLOPs: fvcore convention of tools/model_zoo.py's segmentation protocol (backbone + decode
    head) at the benchmark size; "× R50 latency per GFLOP" = (latency / GFLOPs) over R50's
    (bold above 1.3). CUDA (fp32 and AMP float16) runs too when a GPU is present.
    """
    args.models = reference_first(args.models, SEGMENTOR_REFERENCE)
    settings = device_settings(args)
    results = {}
    for setting, (device, amp) in settings.items():
        progress(f"{setting}:")
        results[setting] = measure_segmentors(args, device, amp)
    return Report(
        settings=f"{args.height}x{args.width}, batch 1, {args.warmup} warm-up + {args.rounds} "
        "inference rounds",
        tables=[segmentor_table(s, r, SEGMENTOR_REFERENCE) for s, r in results.items()],
        results=results,
    )
