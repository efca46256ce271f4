"""ADE20K's label convention and the conversion to Detectron2's (``annotations_detectron2/``).

ADEChallengeData2016 stores labels as 8-bit PNGs with 0 = "other objects" (unlabelled) and
1-150 = the classes. Detectron2's ``ade20k_sem_seg_{train,val}`` read
``annotations_detectron2/{training,validation}/*.png`` with 0 becoming 255 (ignored) and class k
becoming k-1: mmsegmentation's ``reduce_zero_label=True``, done once offline.
"""

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, Union

import numpy as np
from PIL import Image

from .sem_seg import LabelError, read_label

__all__ = [
    "ADE20K_NUM_CLASSES",
    "ADE20K_SPLITS",
    "convert_ade20k_annotations",
    "reduce_zero_label",
]

ADE20K_NUM_CLASSES = 150
ADE20K_SPLITS = ("training", "validation")
RAW_DIR, CONVERTED_DIR = "annotations", "annotations_detectron2"

logger = logging.getLogger(__name__)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE's raw label to Detectron2's: 0 (unlabelled) -> 255, k -> k - 1 (uint8 in, uint8 out)."""
    if label.dtype != np.uint8:
        raise ValueError(
            f"reduce_zero_label: expected a uint8 label, got {label.dtype}"
        )
    return label - np.uint8(1)  # uint8 arithmetic wraps 0 to 255


def _convert_file(source: Path, target: Path, num_classes: int) -> None:
    label = read_label(str(source))
    if label.max(initial=0) > num_classes:
        bad = np.unique(label[label > num_classes])[:10].tolist()
        raise LabelError(
            f"label file {source}: raw values {bad} above {num_classes}; expected ADE20K's 0 "
            f"(unlabelled) and 1-{num_classes} (the classes)"
        )
    Image.fromarray(reduce_zero_label(label)).save(target)


def convert_ade20k_annotations(
    dataset_dir: Union[str, os.PathLike], num_classes: int = ADE20K_NUM_CLASSES
) -> Dict[str, int]:
    """Write ``annotations_detectron2/<split>/`` from ``annotations/<split>/`` for both splits of
    an ADEChallengeData2016-layout folder. Each split is written to a temporary folder and renamed
    into place when complete (an existing one is replaced), so a failed or killed conversion leaves
    no partial split behind.

    Returns:
        the number of label files converted per split.

    Raises:
        FileNotFoundError: a split's ``annotations/<split>`` folder is missing.
        LabelError: a label that is not an 8-bit single-channel PNG or has a value above
            ``num_classes``; the file is named.
    """
    dataset_dir = Path(dataset_dir)
    counts = {}
    for split in ADE20K_SPLITS:
        source_dir = dataset_dir / RAW_DIR / split
        if not source_dir.is_dir():
            raise FileNotFoundError(
                f"{source_dir} does not exist: expected the ADEChallengeData2016 layout "
                f"(images/{split}/*.jpg, {RAW_DIR}/{split}/*.png) under {dataset_dir}"
            )
        target_dir = dataset_dir / CONVERTED_DIR / split
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        temp_dir = (
            target_dir.parent / f".{split}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        temp_dir.mkdir()
        try:
            files = sorted(source_dir.glob("*.png"))
            for i, source in enumerate(files):
                _convert_file(source, temp_dir / source.name, num_classes)
                if (i + 1) % 2000 == 0:
                    logger.info(f"{split}: {i + 1} of {len(files)} labels converted")
            if target_dir.exists():
                shutil.rmtree(target_dir)
            os.rename(temp_dir, target_dir)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
        counts[split] = len(files)
    return counts
