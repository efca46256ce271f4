#!/usr/bin/env python
r"""Convert an official or timm-trained checkpoint to a Detectron2 checkpoint for hybrid_d2.

    python tools/convert_pretrained.py --family mixformer --variant b4 \
        MixFormer_B4_pretrained.pdparams mixformer_b4_d2.pth
    python tools/convert_pretrained.py --family dilateformer --variant small --ema \
        checkpoint.pth dilateformer_s_d2.pth
    python tools/convert_pretrained.py --family dmf --variant s --ema \
        checkpoint-441.pth dmf_s_d2.pth
    python tools/convert_pretrained.py --family dualformer --from timm --ema \
        output/train/<run>/model_best.pth.tar dualformer_s_d2.pth
    python tools/convert_pretrained.py --family mixformer --variant b1 --keep-head \
        MixFormer_B1_pretrained.pdparams mixformer_b1_timm.pth

The output loads with DetectionCheckpointer (MODEL.WEIGHTS) into an FPN model whose bottom-up
network is the family's backbone. ``--from timm`` reads a timm ``train.py`` checkpoint of a
``hybrid_<family>_<variant>`` classifier (the variant comes from its ``arch``). ``--keep-head``
keeps the classifier of official weights instead, for ``timm.create_model(...,
checkpoint_path=...)`` (ImageNet evaluation). Where the official files are and the command per
variant: docs/mixformer.md, docs/dilateformer.md ("Weights"); timm: docs/pretraining.md.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import argparse
import pickle
import sys
from typing import List, Optional, Tuple

import torch

from hybrid_d2.checkpoint import (
    convert_timm_checkpoint,
    load_checkpoint_file,
    read_torch_checkpoint,
)
from hybrid_d2.layers import FAMILIES, model_name
from hybrid_d2.utils import atomic_output


def _convert(args: argparse.Namespace) -> Tuple[dict, int, int, str]:
    """(checkpoint to write, tensors read, keys dropped, variant)."""
    if args.source == "timm":
        if args.keep_head:
            raise ValueError("--keep-head: a timm checkpoint loads into timm as it is")
        checkpoint = read_torch_checkpoint(args.input)
        state_dict, dropped, variant = convert_timm_checkpoint(
            checkpoint, args.input, args.family, args.variant, use_ema=args.ema
        )
        read = len(checkpoint["state_dict_ema" if args.ema else "state_dict"])
    else:
        family = FAMILIES[args.family]
        if family.converter is None:
            raise ValueError(
                f"--family {args.family}: no official weights exist; pretrain with timm and "
                "convert with --from timm (docs/pretraining.md)"
            )
        if args.variant is None:
            raise ValueError("--variant is required with --from official")
        variant = args.variant
        official = load_checkpoint_file(args.input, use_ema=args.ema)
        state_dict, dropped = family.convert_official(official, variant, keep_head=args.keep_head)
        read = len(official)
    if args.keep_head:
        checkpoint = {"state_dict": state_dict, "arch": model_name(args.family, variant)}
    else:
        checkpoint = {"model": state_dict, "__author__": "hybrid_d2", "matching_heuristics": False}
    return checkpoint, read, len(dropped), variant


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument(
        "--variant",
        help="e.g. b4 (mixformer B4), small (dilateformer S) or xs (dmf XS); with --from timm "
        "it is read from the checkpoint's 'arch'",
    )
    parser.add_argument(
        "--from",
        dest="source",
        choices=("official", "timm"),
        default="official",
        help="official weights (default) or a timm train.py checkpoint of our classifier",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="convert the EMA weights ('model_ema' / 'state_dict_ema')",
    )
    parser.add_argument(
        "--keep-head",
        action="store_true",
        help="keep the classifier of official weights: a checkpoint for timm, not Detectron2",
    )
    parser.add_argument("input", help="checkpoint to convert (.pdparams or a PyTorch file)")
    parser.add_argument("output", help="checkpoint to write (.pth)")
    args = parser.parse_args(argv)

    try:
        checkpoint, read, dropped, variant = _convert(args)
        with atomic_output(args.output) as tmp_path:
            torch.save(checkpoint, tmp_path)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tensors = checkpoint.get("model", checkpoint.get("state_dict"))
    use = "not in the classifier" if args.keep_head else "not used for detection"
    print(
        f"{args.family} {variant}: wrote {len(tensors)} tensors to {args.output} "
        f"({read} read, {dropped} dropped: {use})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
