#!/usr/bin/env python
"""
Write ADE20K's labels in Detectron2's convention: annotations_detectron2/{training,validation}/
from annotations/{training,validation}/ (0 "unlabelled" -> 255, class k -> k - 1), which
Detectron2's ade20k_sem_seg_{train,val} and hybrid_d2's training and evaluation read.

    python datasets/prepare_ade20k_sem_seg.py                     # $DETECTRON2_DATASETS/ADEChallengeData2016
    python datasets/prepare_ade20k_sem_seg.py /data/ADEChallengeData2016

The generated shapes_sem_seg set is written in the same layout and converted by the same code
(hybrid_d2.data.ade20k), when it is first used. Exits with status 1 and one line `error: ...` on
a missing folder or a label that is not an ADE20K label.
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from hybrid_d2.data.ade20k import convert_ade20k_annotations  # noqa: E402
from hybrid_d2.data.sem_seg import LabelError  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    default = os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "ADEChallengeData2016"
    )
    parser.add_argument("dataset_dir", nargs="?", default=default, help=f"default: {default}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = convert_ade20k_annotations(args.dataset_dir)
    except (FileNotFoundError, LabelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for split, count in counts.items():
        print(
            f"{split}: {count} labels written to {Path(args.dataset_dir) / 'annotations_detectron2' / split}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
