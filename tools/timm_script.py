#!/usr/bin/env python
r"""Run one of timm's scripts (train.py, validate.py, ... of a pytorch-image-models checkout) with
hybrid_d2's classifiers registered, so that ``--model hybrid_<family>_<variant>`` works.

    python tools/timm_script.py ~/pytorch-image-models/validate.py --data-dir /data/imagenet \
        --model hybrid_mixformer_b1 --checkpoint mixformer_b1_timm.pth
    torchrun --nproc_per_node=8 tools/timm_script.py ~/pytorch-image-models/train.py \
        --data-dir /data/imagenet --model hybrid_dmf_s ...

The pip package of timm does not ship these scripts, and they take no plugin imports: this wrapper
imports hybrid_d2 (which registers the models) and runs the script as ``__main__`` with the
remaining arguments. docs/pretraining.md has the command line of each family.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import os
import runpy
import sys
from typing import List, Optional

import hybrid_d2  # noqa: F401  (registers the hybrid_* classifiers with timm)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        got = argv[0] if argv else "nothing"
        sys.exit(f"error: expected the path of a timm script (e.g. train.py) first, got {got}")
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))  # as `python script.py` would
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
