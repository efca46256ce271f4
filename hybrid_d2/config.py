"""Every config key hybrid_d2 adds to Detectron2's defaults, in one place."""

import difflib
import os
import re
from typing import Sequence

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from . import backbones  # noqa: F401  (registers the families)
from .layers.registration import FAMILIES, add_family_config


def add_hybrid_config(cfg: CN) -> None:
    """Add the keys of every registered backbone family, the generic FPN wiring and the solver.

    Each family's keys, ``MODEL.<FAMILY>.*``, come from its declaration (``FAMILY`` in
    ``hybrid_d2/backbones/<family>.py``, see ``hybrid_d2.layers.registration.add_family_config``):
    VARIANT, OUT_FEATURES, DROP_PATH_RATE (None: the variant's own rate), the family's options
    with their defaults and comments, OUTPUT_NORM and USE_CHECKPOINT. They are:

    * MODEL.MIXFORMER: NORM, POOLED_NORM (hybrid_d2/backbones/mixformer.py)
    * MODEL.DILATEFORMER: NORM, STAGE3_ATTENTION, WINDOW_SIZE (dilateformer.py)
    * MODEL.DUALFORMER: NORM, DOWNSAMPLE_RATES, INTRA_MODE, HASH_SEED (dualformer.py)
    * MODEL.DMF: NORM, POOLED_NORM, KERNEL_TEMPERATURE, GRN, FROZEN_BLOCKS (dmf.py)
    * MODEL.DMFORMER: NORM, BRANCHES (dmformer.py)
    """
    _add_fpn_config(cfg)
    for family in FAMILIES.values():
        add_family_config(cfg, family)
    _add_solver_config(cfg)
    _add_segmentation_config(cfg)


def _add_fpn_config(cfg: CN) -> None:
    # Name (in BACKBONE_REGISTRY) of the bottom-up network that build_hybrid_fpn_backbone and
    # build_hybrid_retinanet_backbone put under the FPN, e.g. "build_mixformer_backbone".
    cfg.MODEL.FPN.BOTTOM_UP = "build_mixformer_backbone"
    # Input of RetinaNet's P6/P7 block: "res5" (C5, the DMF paper and mmdetection "on_input") or
    # "p5" (the FPN output P5).
    cfg.MODEL.FPN.TOP_BLOCK_IN_FEATURE = "res5"


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
        {
            "ENABLED": False,
            "IN_FEATURE": "res4",
            "CHANNELS": 256,
            "NUM_CONVS": 1,
            "LOSS_WEIGHT": 0.4,
        }
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
        cfg.merge_from_file(
            config_file, allow_unsafe=False
        )  # no yaml.unsafe_load fallback
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
