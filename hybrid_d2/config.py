"""Every config key hybrid_d2 adds to Detectron2's defaults, in one place."""
import difflib
import os
import re
from typing import Sequence

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_hybrid_config(cfg: CN) -> None:
    """Add the keys of every hybrid_d2 backbone family, the generic FPN wiring and the solver."""
    _add_fpn_config(cfg)
    _add_mixformer_config(cfg)
    _add_dilateformer_config(cfg)
    _add_dualformer_config(cfg)
    _add_dmf_config(cfg)
    _add_dmformer_config(cfg)
    _add_solver_config(cfg)
    _add_segmentation_config(cfg)


def _add_fpn_config(cfg: CN) -> None:
    # Name (in BACKBONE_REGISTRY) of the bottom-up network that build_hybrid_fpn_backbone and
    # build_hybrid_retinanet_backbone put under the FPN, e.g. "build_mixformer_backbone".
    cfg.MODEL.FPN.BOTTOM_UP = "build_mixformer_backbone"
    # Input of RetinaNet's P6/P7 block: "res5" (C5, the DMF paper and mmdetection "on_input") or
    # "p5" (the FPN output P5).
    cfg.MODEL.FPN.TOP_BLOCK_IN_FEATURE = "res5"


def _add_mixformer_config(cfg: CN) -> None:
    cfg.MODEL.MIXFORMER = CN()
    cfg.MODEL.MIXFORMER.VARIANT = "b1"  # b0 .. b6 (docs/mixformer.md, "Variants")
    cfg.MODEL.MIXFORMER.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth; None: the variant's default, b0 0.0, b1 0.0, b2 0.05, b3 0.1, b4 0.2,
    # b5 0.3, b6 0.5 (hybrid_d2.backbones.mixformer.VARIANTS).
    cfg.MODEL.MIXFORMER.DROP_PATH_RATE = None
    # Norm of the backbone's BatchNorms: "BN", "SyncBN" or "FrozenBN".
    cfg.MODEL.MIXFORMER.NORM = "BN"
    # Norm of the channel interaction's BatchNorm, which sees a 1x1 pooled map (docs/mixformer.md):
    # "FrozenStatsBN" (running statistics always, trainable affine: works with 1 image per device),
    # "BN" or "SyncBN" (batch statistics as in the official code; needs >= 2 images per norm group).
    cfg.MODEL.MIXFORMER.POOLED_NORM = "FrozenStatsBN"
    # A fresh LayerNorm on each output (Swin's detection convention).
    cfg.MODEL.MIXFORMER.OUTPUT_NORM = True
    # Recompute each block in the backward pass to save activation memory.
    cfg.MODEL.MIXFORMER.USE_CHECKPOINT = False


def _add_dilateformer_config(cfg: CN) -> None:
    cfg.MODEL.DILATEFORMER = CN()
    cfg.MODEL.DILATEFORMER.VARIANT = "small"  # tiny, small, base (paper Table II)
    cfg.MODEL.DILATEFORMER.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth; None: the variant's detection default, tiny 0.2, small 0.2, base 0.3
    # (hybrid_d2.backbones.dilateformer.VARIANTS; ImageNet used 0.1).
    cfg.MODEL.DILATEFORMER.DROP_PATH_RATE = None
    # Norm of the stem's and downsamplers' BatchNorms: "FrozenBN" (ImageNet statistics; 2 images
    # per GPU make batch statistics noisy), "BN" or "SyncBN".
    cfg.MODEL.DILATEFORMER.NORM = "FrozenBN"
    # Stage-3 attention (docs/dilateformer.md): "global" (the classification model), "window"
    # (non-overlapping windows) or "mixed" (window / shifted window / global blocks, the paper's
    # detection setting; pattern per variant in hybrid_d2.backbones.dilateformer.VARIANTS).
    cfg.MODEL.DILATEFORMER.STAGE3_ATTENTION = "mixed"
    # Window side of the stage-3 window and shifted-window blocks: 7 (Swin) or 14.
    cfg.MODEL.DILATEFORMER.WINDOW_SIZE = 7
    # A fresh LayerNorm on each output (Swin/NAT detection convention).
    cfg.MODEL.DILATEFORMER.OUTPUT_NORM = True
    # Recompute each block in the backward pass to save activation memory.
    cfg.MODEL.DILATEFORMER.USE_CHECKPOINT = False


def _add_dualformer_config(cfg: CN) -> None:
    cfg.MODEL.DUALFORMER = CN()
    cfg.MODEL.DUALFORMER.VARIANT = "small"  # tiny, xsmall, small, base (paper Table 1)
    cfg.MODEL.DUALFORMER.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth; None: the variant's COCO default, tiny 0.1, xsmall 0.1, small 0.2,
    # base 0.4 (hybrid_d2.backbones.dualformer.VARIANTS).
    cfg.MODEL.DUALFORMER.DROP_PATH_RATE = None
    # Norm of every BatchNorm (stem, downsamplers, MBConv, MHPA reduction): "SyncBN", "BN" or
    # "FrozenBN". No ImageNet statistics exist, so the configs train them ("SyncBN").
    cfg.MODEL.DUALFORMER.NORM = "SyncBN"
    # MHPA resolution reduction k per stage: (4, 2, 1, 1) (default) or (8, 4, 2, 1).
    cfg.MODEL.DUALFORMER.DOWNSAMPLE_RATES = (4, 2, 1, 1)
    # Intra-partition attention: "pool" (one softmax-pooled proxy per partition, scattered back)
    # or "token" (each token's softmax weight within its partition times its value).
    cfg.MODEL.DUALFORMER.INTRA_MODE = "pool"
    # Seed of the fixed LSH hyperplanes (buffers, saved in checkpoints); block i uses SEED + i.
    cfg.MODEL.DUALFORMER.HASH_SEED = 0
    # A fresh LayerNorm on each output.
    cfg.MODEL.DUALFORMER.OUTPUT_NORM = True
    # Recompute each block in the backward pass to save activation memory.
    cfg.MODEL.DUALFORMER.USE_CHECKPOINT = False


def _add_dmf_config(cfg: CN) -> None:
    cfg.MODEL.DMF = CN()
    cfg.MODEL.DMF.VARIANT = "s"  # xxs, xs, s (paper Table 1)
    cfg.MODEL.DMF.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth; None: the variant's default, 0.1 for xxs, xs and s (the paper's and the
    # official detection configs' value; hybrid_d2.backbones.dmf.VARIANTS).
    cfg.MODEL.DMF.DROP_PATH_RATE = None
    # Norm of the BatchNorms on feature maps: "BN", "SyncBN" (the paper's COCO runs) or "FrozenBN".
    cfg.MODEL.DMF.NORM = "BN"
    # Norm of the kernel attentions' BatchNorm, which sees one pooled vector per image
    # (docs/dmf.md): "FrozenStatsBN" (running statistics, trainable affine: works with 1 image per
    # device), "FrozenBN", or "BN" / "SyncBN" (batch statistics as in the official code; needs
    # >= 2 images per norm group in training).
    cfg.MODEL.DMF.POOLED_NORM = "FrozenStatsBN"
    # T in the kernel attention's sigmoid(logits / T); 1 in the official detection code.
    cfg.MODEL.DMF.KERNEL_TEMPERATURE = 1.0
    # GRN of the IRFFN: "dmf_code" (the official code's, normaliser ~1) or "convnextv2".
    cfg.MODEL.DMF.GRN = "dmf_code"
    # Freeze DMF blocks 0 ... FROZEN_BLOCKS - 1 (parameters and eval mode) and nothing else; 4 is
    # the official detection setting (mmdet frozen_stages=1), which the paper's detection
    # parameter counts imply. Applies on top of MODEL.BACKBONE.FREEZE_AT.
    cfg.MODEL.DMF.FROZEN_BLOCKS = 0
    # A fresh LayerNorm on each output (the official detection backbone has none).
    cfg.MODEL.DMF.OUTPUT_NORM = False
    # Recompute each block in the backward pass to save activation memory.
    cfg.MODEL.DMF.USE_CHECKPOINT = False


def _add_dmformer_config(cfg: CN) -> None:
    cfg.MODEL.DMFORMER = CN()
    cfg.MODEL.DMFORMER.VARIANT = "s"  # s, l (paper Table 2)
    cfg.MODEL.DMFORMER.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth; None: the variant's detection default, s 0.1, l 0.2 (not in the paper;
    # hybrid_d2.backbones.dmformer.VARIANTS, docs/dmformer.md).
    cfg.MODEL.DMFORMER.DROP_PATH_RATE = None
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


def _add_segmentation_config(cfg: CN) -> None:
    """Semantic segmentation (docs/segmentation.md): mmsegmentation's UperNet / Semantic FPN heads,
    its ADE20K training pipeline, poly lr and multi-scale test. Detectron2's own SEM_SEG_HEAD keys
    (NAME, IN_FEATURES, NUM_CLASSES, IGNORE_VALUE, CONVS_DIM, COMMON_STRIDE, NORM, LOSS_WEIGHT)
    keep their meaning."""
    head = cfg.MODEL.SEM_SEG_HEAD
    # Dropout2d before the classifier (mmseg decode heads: 0.1).
    head.DROPOUT = 0.1
    # Cross entropy averaged over the labelled pixels only (True, Detectron2) or over every pixel,
    # ignored ones counting 0 (False, mmseg's CrossEntropyLoss default, which the papers used).
    head.LOSS_AVG_NON_IGNORE = False
    # UperNetHead: channels of every conv, pyramid pooling scales on the coarsest feature.
    head.UPERNET = CN({"CHANNELS": 512, "POOL_SCALES": (1, 2, 3, 6)})
    # UperNetHead's auxiliary FCN head (training only; Base-UperNet-160k.yaml enables it): NUM_CONVS
    # 3x3 convs of CHANNELS on IN_FEATURE, its loss weighted LOSS_WEIGHT (mmseg's upernet configs).
    head.AUX = CN(
        {"ENABLED": False, "IN_FEATURE": "res4", "CHANNELS": 256, "NUM_CONVS": 1, "LOSS_WEIGHT": 0.4}
    )
    # Training resize (mmseg Resize(ratio_range)): the scale (MIN_SIZE_TRAIN[0], MAX_SIZE_TRAIN)
    # times a ratio drawn uniformly from this range, keeping the aspect ratio.
    cfg.INPUT.RESIZE_RATIO_RANGE = (0.5, 2.0)
    # Retry the random crop (up to 10 times) until no category covers more than this fraction of
    # it (mmseg RandomCrop(cat_max_ratio)); 1.0 turns the constraint off.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # SSD photometric distortion (mmseg PhotoMetricDistortion) after the flip.
    cfg.INPUT.COLOR_AUG_SSD = False
    # WarmupPolyLR (SOLVER.LR_SCHEDULER_NAME): lr * (1 - iter / MAX_ITER) ** POLY_LR_POWER, never
    # below BASE_LR * POLY_LR_CONSTANT_ENDING; power 1.0 is the papers' "linear" schedule.
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # Multi-scale test (TEST.AUG.ENABLED): each image resized from the original to these ratios of
    # (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST), flipped too if TEST.AUG.FLIP.
    cfg.TEST.AUG.RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """Detectron2's defaults plus hybrid_d2's keys, merged with a yaml file (``_BASE_`` included)
    and ``KEY VALUE`` overrides; see :func:`merge_config_file` for the errors."""
    cfg = get_cfg()
    add_hybrid_config(cfg)
    merge_config_file(cfg, config_file, opts)
    return cfg


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file (and line)."""


def merge_config_file(cfg: CN, config_file: str, opts: Sequence[str] = ()) -> None:
    """Merge a yaml file (with ``_BASE_`` inheritance) and ``KEY VALUE`` overrides into cfg.

    Raises:
        ConfigError: a missing file, a YAML syntax error (file and line), a YAML tag that safe
            loading refuses, an unknown key (with the closest known keys) or a value of the wrong
            type, each naming the file or the command line.
    """
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)  # no yaml.unsafe_load fallback
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error_message(config_file, e)) from None
    except KeyError as e:
        raise ConfigError(_unknown_key_message(cfg, config_file, str(e))) from None
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"{config_file}: {e}") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as e:  # yacs asserts on unknown keys from a list
        raise ConfigError(_unknown_key_message(cfg, "command line", str(e))) from None
    except ValueError as e:
        raise ConfigError(f"command line: {e}") from None


def _yaml_error_message(config_file: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return f"{config_file}: invalid YAML: {problem}"
    name = mark.name if mark.name and not mark.name.startswith("<") else config_file
    return f"{name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"


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
