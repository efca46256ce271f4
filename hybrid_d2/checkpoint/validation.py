"""Check a converted state dict against the keys and shapes of the network it is meant for."""

from typing import Dict, Tuple

import torch

__all__ = ["check_state_dict"]


def check_state_dict(
    converted: Dict[str, torch.Tensor],
    expected: Dict[str, Tuple[int, ...]],
    model_name: str,
    variant: str,
) -> None:
    """Raise one ValueError listing every missing key, unexpected key and shape mismatch.

    Args:
        converted: the converted tensors, under the network's own names.
        expected: the network's state-dict names and shapes.
        model_name: e.g. "MixFormer-B4", for the message.
        variant: the variant the caller asked for, for the message.
    """
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = [
        f"  {name}: expected {list(expected[name])}, got {list(converted[name].shape)}"
        for name in sorted(set(expected) & set(converted))
        if tuple(converted[name].shape) != tuple(expected[name])
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [
        f"checkpoint does not fit {model_name} ({len(missing)} missing keys, "
        f"{len(unexpected)} unexpected keys, {len(mismatched)} shape mismatches); "
        f"does the checkpoint match variant {variant!r}?"
    ]
    if missing:
        lines += [f"missing keys ({len(missing)}):"] + [f"  {name}" for name in missing]
    if unexpected:
        lines += [f"unexpected keys ({len(unexpected)}):"] + [
            f"  {name}" for name in unexpected
        ]
    if mismatched:
        lines += [f"shape mismatches ({len(mismatched)}):"] + mismatched
    raise ValueError("\n".join(lines))
