#!/usr/bin/env python
r"""Convert an official backbone checkpoint to a Detectron2 checkpoint for hybrid_d2.

    python tools/convert_pretrained.py --family mixformer --variant b4 \
        MixFormer_B4_pretrained.pdparams mixformer_b4_d2.pth
    python tools/convert_pretrained.py --family dilateformer --variant small --ema \
        checkpoint.pth dilateformer_s_d2.pth
    python tools/convert_pretrained.py --family dmf --variant s --ema checkpoint-441.pth dmf_s_d2.pth

The output loads with DetectionCheckpointer (MODEL.WEIGHTS) into an FPN model whose bottom-up
network is the family's backbone. Where the official files are and the command per variant:
docs/mixformer.md and docs/dilateformer.md ("Weights").
"""

import argparse
import pickle
import sys
from typing import List, Optional

import torch

from hybrid_d2.checkpoint import CONVERTERS, load_checkpoint_file
from hybrid_d2.utils import atomic_output


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(CONVERTERS))
    parser.add_argument(
        "--variant",
        required=True,
        help="e.g. b4 (mixformer B4), small (dilateformer S) or xs (dmf XS)",
    )
    parser.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights")
    parser.add_argument("input", help="official checkpoint (.pdparams or a PyTorch file)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    args = parser.parse_args(argv)

    try:
        official = load_checkpoint_file(args.input, use_ema=args.ema)
        state_dict, dropped = CONVERTERS[args.family](official, args.variant)
        checkpoint = {"model": state_dict, "__author__": "hybrid_d2", "matching_heuristics": False}
        with atomic_output(args.output) as tmp_path:
            torch.save(checkpoint, tmp_path)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.family} {args.variant}: wrote {len(state_dict)} tensors to {args.output} "
        f"({len(official)} read, {len(dropped)} dropped: not used for detection)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
