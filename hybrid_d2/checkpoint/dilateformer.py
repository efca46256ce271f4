"""Convert an official DilateFormer ImageNet checkpoint for hybrid_d2 (docs/dilateformer.md,
"Weights").

The official files (JIAOJIAYUASD/dilateformer, ``main.py``) are DeiT-style dicts with ``model``
and ``model_ema`` state dicts (``load_checkpoint_file`` picks one).
``hybrid_d2.backbones.dilateformer`` uses the official module names and layouts (the MSDA ``qkv``
of stages 1-2 is the same (3C, C, 1, 1) 1x1 conv, the global-attention ``qkv`` of stages 3-4 the
same (3C, C) Linear, which the stage-3 window blocks reuse), so conversion drops the classifier,
prefixes the names and validates every key and shape. With ``keep_head`` it keeps the classifier
(not the token-labeling head) and the official names: a state dict for the timm classifier
``hybrid_dilateformer_<variant>``.
"""

import logging
from typing import Dict, List, Tuple

import torch

from ..backbones.dilateformer import (
    DilateFormer,
    DilateFormerClassifier,
    variant_config,
)
from .validation import check_state_dict

logger = logging.getLogger(__name__)

# Where D2DilateFormer's network sits in a Detectron2 FPN model (GeneralizedRCNN, RetinaNet).
PREFIX = "backbone.bottom_up.net."
# Classification only: the final LayerNorm, the classifier, and the token-labeling auxiliary head
# of the "*" checkpoints (LV-ViT's name ``aux_head``; the paper: "an extra fully connected layer").
_CLASSIFIER_PREFIXES = ("norm.", "head.", "aux_head.")
_AUX_PREFIXES = ("aux_head.",)


def _expected_shapes(variant: str, keep_head: bool) -> Dict[str, Tuple[int, ...]]:
    config = variant_config(variant)
    with torch.device("meta"):  # shapes only, no memory or init cost
        if keep_head:
            network = DilateFormerClassifier(variant)
        else:
            network = DilateFormer(
                config["embed_dim"], config["depths"], config["num_heads"], norm="BN"
            )
    return {name: tuple(t.shape) for name, t in network.state_dict().items()}


def convert_dilateformer(
    official: Dict[str, torch.Tensor], variant: str, keep_head: bool = False
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Convert an official DilateFormer state dict for the given variant ("tiny", "small",
    "base").

    Returns:
        the state dict with keys prefixed by ``PREFIX`` (``keep_head``: the classifier's keys,
        unprefixed), and the dropped keys.

    Raises:
        ValueError listing every missing key, unexpected key and shape mismatch.
    """
    expected = _expected_shapes(variant, keep_head)
    drop = _AUX_PREFIXES if keep_head else _CLASSIFIER_PREFIXES
    converted, dropped = {}, []
    for name, tensor in official.items():
        if name.startswith(drop):
            dropped.append(name)
        else:
            converted[name] = tensor.contiguous()
    check_state_dict(converted, expected, f"DilateFormer-{variant}", variant)
    if dropped:
        logger.info("dropped %d keys: %s", len(dropped), dropped)
    prefix = "" if keep_head else PREFIX
    return {prefix + name: tensor for name, tensor in converted.items()}, dropped
