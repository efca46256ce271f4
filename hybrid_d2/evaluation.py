"""Pick Detectron2's evaluator from a dataset's ``evaluator_type`` metadata."""

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    LVISEvaluator,
    SemSegEvaluator,
)

from .data.sem_seg import check_label_values, read_label


class CheckedSemSegEvaluator(SemSegEvaluator):
    """Detectron2's SemSegEvaluator (mIoU, fwIoU, mACC, pACC, per-class IoU and accuracy; pixels
    of the dataset's ignore_label excluded) whose ground-truth labels are checked as they are read:
    a value that is neither a class id nor ignore_label is an error naming the file, where the
    confusion matrix would silently count it in a wrong cell or fail."""

    def __init__(
        self, dataset_name: str, distributed: bool = True, output_dir: str = None
    ):
        super().__init__(
            dataset_name,
            distributed,
            output_dir,
            sem_seg_loading_fn=self._read_checked_label,
        )

    def _read_checked_label(self, path: str, dtype=int) -> np.ndarray:
        label = read_label(path)
        check_label_values(label, path, self._num_classes, self._ignore_label)
        return label.astype(dtype)


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_dir: str
) -> DatasetEvaluator:
    """COCO (boxes, masks, keypoints; tasks follow the predictions), LVIS or semantic
    segmentation (:class:`CheckedSemSegEvaluator`) evaluator.

    Keypoint OKS sigmas come from ``TEST.KEYPOINT_OKS_SIGMAS`` or, if that is empty, from the
    dataset's ``keypoint_oks_sigmas`` metadata (needed for non-COCO keypoint sets).
    """
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type")
    max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
    if evaluator_type == "coco":
        sigmas = tuple(cfg.TEST.KEYPOINT_OKS_SIGMAS) or tuple(
            metadata.get("keypoint_oks_sigmas", ())
        )
        return COCOEvaluator(
            dataset_name,
            output_dir=output_dir,
            max_dets_per_image=max_dets,
            kpt_oks_sigmas=sigmas,
        )
    if evaluator_type == "lvis":
        return LVISEvaluator(
            dataset_name, output_dir=output_dir, max_dets_per_image=max_dets
        )
    if evaluator_type == "sem_seg":
        return CheckedSemSegEvaluator(dataset_name, output_dir=output_dir)
    raise ValueError(
        f"Dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; hybrid_d2 evaluates "
        "'coco' (boxes, masks, keypoints), 'lvis' and 'sem_seg' datasets"
    )
