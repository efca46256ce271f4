"""Convert an official Dynamic Mobile-Former ImageNet checkpoint for hybrid_d2.

The official training script (``ysj9909/DMF``, ``utils.save_model``) writes a dict with
``model``, ``optimizer``, ``epoch``, ``scaler``, ``args`` (an ``argparse.Namespace``) and, with
EMA, ``model_ema``; ``load_checkpoint_file`` picks the state dict. ``hybrid_d2.backbones.dmf``
uses the official module names and layouts (the official mmdet backbone loads the classification
names unchanged), so conversion drops the classifier tail, prefixes the names and validates every
key and shape. The ``num_batches_tracked`` counters are kept: the shipped
configs freeze blocks 0-3 with Detectron2's ``convert_frozen_batchnorm``, whose FrozenBatchNorm2d
keeps a counter buffer, so without them loading would report those keys missing. With
``keep_head`` the classifier tail is kept under the official names: a state dict for the timm
classifier ``hybrid_dmf_<variant>``.
"""

import logging
from typing import Dict, List, Tuple

import torch

from ..backbones.dmf import DMFClassifier, DynamicMobileFormer, variant_config
from .validation import check_state_dict

logger = logging.getLogger(__name__)

# Where D2DynamicMobileFormer's network sits in a Detectron2 FPN model (GeneralizedRCNN,
# RetinaNet).
PREFIX = "backbone.bottom_up.net."
# Classification only: the final cross-attention and Former on the tokens, the dynamic 1x1 conv,
# its BatchNorm and the two-layer head (paper §3.6).
_CLASSIFIER_PREFIXES = (
    "end_mobile2former.",
    "end_former.",
    "channel_conv.",
    "bn.",
    "head.",
)


def _expected_shapes(variant: str, keep_head: bool) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):  # shapes only, no memory or init cost
        if keep_head:
            network = DMFClassifier(variant)
        else:
            network = DynamicMobileFormer(
                **variant_config(variant), norm="BN", pooled_norm="BN"
            )
    return {name: tuple(t.shape) for name, t in network.state_dict().items()}


def convert_dmf(
    official: Dict[str, torch.Tensor], variant: str, keep_head: bool = False
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Convert an official DMF state dict for the given variant ("xxs", "xs", "s").

    Returns:
        the state dict with keys prefixed by ``PREFIX`` (``keep_head``: the classifier's keys,
        unprefixed), and the dropped classifier keys.

    Raises:
        ValueError listing every missing key, unexpected key and shape mismatch.
    """
    expected = _expected_shapes(variant, keep_head)
    converted, dropped = {}, []
    for name, tensor in official.items():
        if not keep_head and name.startswith(_CLASSIFIER_PREFIXES):
            dropped.append(name)
        else:
            converted[name] = tensor.contiguous()
    check_state_dict(converted, expected, f"DMF-{variant.upper()}", variant)
    if dropped:
        logger.info("dropped %d keys not used for detection: %s", len(dropped), dropped)
    prefix = "" if keep_head else PREFIX
    return {prefix + name: tensor for name, tensor in converted.items()}, dropped
