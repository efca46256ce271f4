"""Turn a timm training checkpoint of one of our ImageNet classifiers into detection weights
(docs/pretraining.md).

timm's ``train.py`` (``CheckpointSaver``) writes ``{"epoch", "arch", "state_dict", "optimizer",
"version", "args", "state_dict_ema"?, "metric"?, amp scaler?}`` with ``arch`` the ``--model``
name, e.g. ``hybrid_dmf_s``. The classifiers subclass the detection trunks, so conversion drops
the classification tail (each classifier's ``TAIL`` modules), checks every trunk key and shape and
prefixes the names for the Detectron2 FPN models.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import backbones  # noqa: F401  (registers the families)
from ..layers import FAMILIES, model_name
from .validation import check_state_dict

__all__ = ["convert_timm_checkpoint", "trunk_state_dict"]

# Where every family's trunk sits in a Detectron2 FPN model (D2* wrappers keep it as ``net``).
PREFIX = "backbone.bottom_up.net."


def _variant_of(arch: Any, family: str, variant: Optional[str], path: str) -> str:
    """The variant named by the checkpoint's ``arch`` (timm's ``--model``), checked against
    ``variant`` when given."""
    names = {model_name(family, v): v for v in FAMILIES[family].variants}
    if arch in names:
        if variant is not None and variant != names[arch]:
            raise ValueError(
                f"{path}: 'arch' is {arch!r}, expected {model_name(family, variant)!r} "
                f"(--variant {variant})"
            )
        return names[arch]
    if variant is None:
        raise ValueError(
            f"{path}: 'arch' is {arch!r}, expected one of {sorted(names)}; "
            "give --variant for a checkpoint saved without timm's args"
        )
    if variant not in names.values():
        raise ValueError(
            f"unknown {family} variant {variant!r}; expected one of {sorted(names)}"
        )
    return variant


def trunk_state_dict(
    state_dict: Dict[str, torch.Tensor], family: str, variant: str, name: str
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Split a classifier's state dict into the checked trunk tensors and the dropped tail keys.

    Raises:
        ValueError listing every missing key, unexpected key and shape mismatch of the trunk.
    """
    cls = FAMILIES[family].classifier
    tail = tuple(f"{module}." for module in cls.TAIL)
    with torch.device("meta"):  # shapes only
        reference = cls(variant).state_dict()
    expected = {
        k: tuple(v.shape) for k, v in reference.items() if not k.startswith(tail)
    }
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    trunk = {k: v for k, v in state.items() if not k.startswith(tail)}
    check_state_dict(trunk, expected, name, variant)
    return trunk, sorted(k for k in state if k.startswith(tail))


def convert_timm_checkpoint(
    checkpoint: Any,
    path: str,
    family: str,
    variant: Optional[str] = None,
    use_ema: bool = False,
) -> Tuple[Dict[str, torch.Tensor], List[str], str]:
    """Detection weights from a timm training checkpoint of ``hybrid_<family>_<variant>``.

    Returns:
        the trunk state dict prefixed by ``PREFIX``, the dropped classifier keys, and the variant.

    Raises:
        ValueError / KeyError naming the file and what was expected.
    """
    if family not in FAMILIES:
        raise ValueError(
            f"unknown family {family!r}; expected one of {sorted(FAMILIES)}"
        )
    if not isinstance(checkpoint, dict) or not isinstance(
        checkpoint.get("state_dict"), dict
    ):
        got = (
            sorted(checkpoint)[:20]
            if isinstance(checkpoint, dict)
            else type(checkpoint).__name__
        )
        raise ValueError(
            f"{path}: not a timm training checkpoint: expected 'state_dict', got {got}"
        )
    variant = _variant_of(checkpoint.get("arch"), family, variant, path)
    key = "state_dict_ema" if use_ema else "state_dict"
    if not isinstance(checkpoint.get(key), dict):
        raise KeyError(
            f"{path}: no {key!r} entry (trained without --model-ema?); has {sorted(checkpoint)}"
        )
    trunk, dropped = trunk_state_dict(
        checkpoint[key], family, variant, f"{path} ({model_name(family, variant)})"
    )
    return {PREFIX + k: v for k, v in trunk.items()}, dropped, variant
