"""Convert an official PaddleClas MixFormer state dict for hybrid_d2.

The official ImageNet-1K weights (B1, B2, B3, B4, B6) are the ``MixFormer_B*_pretrained.pdparams``
files listed in ``MODEL_URLS`` of PaddleClas's ``ppcls/arch/backbone/model_zoo/mixformer.py`` at
commit 60239c9; docs/mixformer.md ("Weights") gives the commands. With ``keep_head`` the
classification tail is kept under the official names: a state dict for the timm classifier
``hybrid_mixformer_<variant>``.
"""

import logging
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..backbones.mixformer import MixFormer, MixFormerClassifier, variant_config
from .validation import check_state_dict

logger = logging.getLogger(__name__)

# Where D2MixFormer's network sits in a Detectron2 FPN model (GeneralizedRCNN, RetinaNet).
PREFIX = "backbone.bottom_up.net."
# The classification tail (LayerNorm, Linear to 1280, classifier; paper Fig. 3), not used for
# detection.
_TAIL_PREFIXES = ("norm.", "last_proj.", "head.")
# Paddle BatchNorm statistics -> PyTorch names.
_BN_RENAMES = {"._mean": ".running_mean", "._variance": ".running_var"}


def _rename(name: str) -> str:
    for old, new in _BN_RENAMES.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def _reference_network(variant: str, keep_head: bool) -> MixFormer:
    config = variant_config(variant)
    config.pop("drop_path_rate")
    with torch.device("meta"):  # shapes only, no memory or init cost
        return MixFormerClassifier(variant) if keep_head else MixFormer(**config)


def convert_mixformer(
    official: Dict[str, torch.Tensor], variant: str, keep_head: bool = False
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Convert a PaddleClas MixFormer state dict for the given variant.

    Paddle Linear weights ([in, out]) are transposed, BatchNorm ``_mean``/``_variance`` renamed, and
    ``num_batches_tracked`` added; ``relative_position_index`` buffers and the classification tail
    are dropped (the tail is kept with ``keep_head``). The result is checked against the
    variant's keys and shapes.

    Returns:
        the state dict with keys prefixed by ``PREFIX`` (``keep_head``: the classifier's keys,
        unprefixed), and the dropped official keys.

    Raises:
        ValueError listing every missing key, unexpected key and shape mismatch (PyTorch
        names and layouts).
    """
    network = _reference_network(variant, keep_head)
    expected = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    linear_weights = {
        f"{name}.weight"
        for name, module in network.named_modules()
        if isinstance(module, nn.Linear)
    }

    converted, dropped = {}, []
    for official_name, tensor in official.items():
        tail = not keep_head and official_name.startswith(_TAIL_PREFIXES)
        if tail or official_name.endswith("relative_position_index"):
            dropped.append(official_name)
            continue
        name = _rename(official_name)
        if name in linear_weights and tensor.dim() == 2:
            tensor = tensor.t()
        converted[name] = tensor.contiguous()
    for name in expected:
        if name.endswith("num_batches_tracked") and name not in converted:
            converted[name] = torch.tensor(0, dtype=torch.long)

    check_state_dict(converted, expected, f"MixFormer-{variant.upper()}", variant)
    if dropped:
        logger.info("dropped %d keys: %s", len(dropped), dropped)
    prefix = "" if keep_head else PREFIX
    return {prefix + name: tensor for name, tensor in converted.items()}, dropped
