#!/usr/bin/env python
"""
Report which files of the datasets used by hybrid_d2 exist under $DETECTRON2_DATASETS.

    python datasets/check_datasets.py                      # COCO 2017, COCO keypoints, LVIS v1, ADE20K
    python datasets/check_datasets.py --shapes             # also generate / validate shapes_*
    python datasets/check_datasets.py coco_2017_val shapes_val

Exits with status 1 if any requested dataset is missing, incomplete or unknown.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from hybrid_d2.data import (  # noqa: E402
    SHAPES_DATASET_NAMES,
    SHAPES_SEM_SEG_DATASET_NAMES,
    IncompleteDatasetError,
    missing_dataset_files,
)

REAL_DATASET_NAMES = [
    "coco_2017_train",
    "coco_2017_val",
    "keypoints_coco_2017_train",
    "keypoints_coco_2017_val",
    "lvis_v1_train",
    "lvis_v1_val",
    "ade20k_sem_seg_train",  # annotations_detectron2/ by datasets/prepare_ade20k_sem_seg.py
    "ade20k_sem_seg_val",
]


def check(dataset_name: str) -> bool:
    """Print the status of one dataset; return whether it is usable."""
    try:
        missing = missing_dataset_files(dataset_name)
    except KeyError as error:
        print(f"UNKNOWN  {dataset_name}: {error.args[0]}")
        return False
    except IncompleteDatasetError as error:
        print(f"BROKEN   {dataset_name}: {error}")
        return False
    if missing:
        print(f"MISSING  {dataset_name}:\n           " + "\n           ".join(missing))
        return False
    print(f"OK       {dataset_name}")
    return True


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="dataset names (default: COCO, keypoints, LVIS, ADE20K)")
    parser.add_argument("--shapes", action="store_true", help="also generate/check shapes_*")
    args = parser.parse_args(argv)
    names = args.names or list(REAL_DATASET_NAMES)
    if args.shapes:
        shapes = SHAPES_DATASET_NAMES + SHAPES_SEM_SEG_DATASET_NAMES
        names += [name for name in shapes if name not in names]
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    print(f"Datasets root: {os.path.abspath(root)} (see datasets/README.md)")
    results = [check(name) for name in names]  # check all, even after a failure
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
