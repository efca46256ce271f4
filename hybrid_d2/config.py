"""Every config key hybrid_d2 adds to Detectron2's defaults, in one place."""
import difflib
import os
import re
from typing import Sequence

from detectron2.config import CfgNode as CN


def add_hybrid_config(cfg: CN) -> None:
    """Add the keys of every hybrid_d2 backbone family, the generic FPN wiring and the solver."""
    _add_fpn_config(cfg)
    _add_mixformer_config(cfg)
    _add_dilateformer_config(cfg)
    _add_dmformer_config(cfg)
    _add_solver_config(cfg)


def _add_fpn_config(cfg: CN) -> None:
    # Name (in BACKBONE_REGISTRY) of the bottom-up network that build_hybrid_fpn_backbone and
    # build_hybrid_retinanet_backbone put under the FPN, e.g. "build_mixformer_backbone".
    cfg.MODEL.FPN.BOTTOM_UP = "build_mixformer_backbone"
    # Input of RetinaNet's P6/P7 block: "res5" (C5, the DMF paper and mmdetection "on_input") or
    # "p5" (the FPN output P5).
    cfg.MODEL.FPN.TOP_BLOCK_IN_FEATURE = "res5"


def _add_mixformer_config(cfg: CN) -> None:
    cfg.MODEL.MIXFORMER = CN()
    cfg.MODEL.MIXFORMER.VARIANT = "b1"  # b0 .. b6 (design note §3.1)
    cfg.MODEL.MIXFORMER.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.MIXFORMER.DROP_PATH_RATE = 0.0
    # Norm of the backbone's BatchNorms: "BN", "SyncBN" or "FrozenBN".
    cfg.MODEL.MIXFORMER.NORM = "BN"
    # Norm of the channel interaction's BatchNorm, which sees a 1x1 pooled map (design note §6 #5):
    # "FrozenStatsBN" (running statistics always, trainable affine: works with 1 image per device),
    # "BN" or "SyncBN" (batch statistics as in the official code; needs >= 2 images per norm group).
    cfg.MODEL.MIXFORMER.POOLED_NORM = "FrozenStatsBN"
    # A fresh LayerNorm on each output (design note §6 #2).
    cfg.MODEL.MIXFORMER.OUTPUT_NORM = True
    # Recompute each block in the backward pass to save activation memory.
    cfg.MODEL.MIXFORMER.USE_CHECKPOINT = False


def _add_dilateformer_config(cfg: CN) -> None:
    cfg.MODEL.DILATEFORMER = CN()
    cfg.MODEL.DILATEFORMER.VARIANT = "small"  # tiny, small, base (design note §3)
    cfg.MODEL.DILATEFORMER.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Detection default for tiny/small; base uses 0.3 (design note §6 #5; ImageNet used 0.1).
    cfg.MODEL.DILATEFORMER.DROP_PATH_RATE = 0.2
    # Norm of the stem's and downsamplers' BatchNorms: "FrozenBN" (ImageNet statistics, design
    # note §6 #4), "BN" or "SyncBN".
    cfg.MODEL.DILATEFORMER.NORM = "FrozenBN"
    # Stage-3 attention (design note §6 #2): "global" (the classification model), "window"
    # (non-overlapping windows) or "mixed" (window / shifted window / global blocks, the paper's
    # detection setting; pattern per variant in hybrid_d2.backbones.dilateformer.VARIANTS).
    cfg.MODEL.DILATEFORMER.STAGE3_ATTENTION = "mixed"
    # Window side of the stage-3 window and shifted-window blocks: 7 (Swin) or 14.
    cfg.MODEL.DILATEFORMER.WINDOW_SIZE = 7
    # A fresh LayerNorm on each output (design note §6 #3).
    cfg.MODEL.DILATEFORMER.OUTPUT_NORM = True
    # Recompute each block in the backward pass to save activation memory.
    cfg.MODEL.DILATEFORMER.USE_CHECKPOINT = False


def _add_dmformer_config(cfg: CN) -> None:
    cfg.MODEL.DMFORMER = CN()
    cfg.MODEL.DMFORMER.VARIANT = "s"  # s, l (paper Table 2)
    cfg.MODEL.DMFORMER.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Not in the paper; our detection default is 0.1 for S and 0.2 for L (docs/dmformer.md).
    cfg.MODEL.DMFORMER.DROP_PATH_RATE = 0.1
    # Every BatchNorm of the backbone: "SyncBN" (batch statistics over all devices, so that
    # 1 image per device trains; Detectron2's naiveSyncBN off CUDA), "BN" (per-device
    # statistics) or "FrozenBN" (fixed statistics, e.g. fine-tuning from ImageNet weights).
    cfg.MODEL.DMFORMER.NORM = "SyncBN"
    # The DMA's three dilated depth-wise convs: "separate" (three convs), "fused" (one depth-wise
    # conv with the summed 19x19 kernel; same function) or "auto": fused for CPU inference,
    # separate otherwise, the faster form of each as measured (docs/dmformer.md).
    cfg.MODEL.DMFORMER.BRANCHES = "auto"
    # A fresh LayerNorm on each output (the blocks end in an un-normalised residual stream).
    cfg.MODEL.DMFORMER.OUTPUT_NORM = True
    # Recompute each block in the backward pass to save activation memory.
    cfg.MODEL.DMFORMER.USE_CHECKPOINT = False


def _add_solver_config(cfg: CN) -> None:
    cfg.SOLVER.OPTIMIZER = "AdamW"  # "AdamW" or "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # Parameters whose local name is one of these get no weight decay (position tables, tokens).
    cfg.SOLVER.NO_WEIGHT_DECAY_KEYS = [
        "relative_position_bias_table",
        "pos_embed",
        "absolute_pos_embed",
        "cls_token",
        "tokens",
    ]
    # Layer-wise lr decay over the backbone blocks: lr * RATE ** (num_layers + 1 - layer_id).
    cfg.SOLVER.LAYER_DECAY = CN({"ENABLED": False, "RATE": 0.9})
    # Write metrics (console, metrics.json, tensorboard) every this many iterations; also the
    # median window of the scalars in metrics.json (1: every iteration's raw losses).
    cfg.SOLVER.WRITER_PERIOD = 20


def merge_config_file(cfg: CN, config_file: str, opts: Sequence[str] = ()) -> None:
    """Merge a yaml file (with ``_BASE_`` inheritance) and ``KEY VALUE`` overrides into cfg.

    An unknown key raises a KeyError naming the file, the key and the closest known keys.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file not found: {config_file}")
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        raise KeyError(_unknown_key_message(cfg, config_file, str(e))) from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as e:  # yacs asserts on unknown keys from a list
        raise KeyError(_unknown_key_message(cfg, "command line", str(e))) from None


def _unknown_key_message(cfg: CN, source: str, error: str) -> str:
    match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", error)
    if not match:
        return f"{source}: {error}"
    key = match.group(1)
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{source}: unknown config key {key}{hint}"


def _all_keys(cfg: CN, prefix: str = "") -> list:
    keys = []
    for name, value in cfg.items():
        full = f"{prefix}{name}"
        keys.extend(_all_keys(value, full + ".") if isinstance(value, CN) else [full])
    return keys
