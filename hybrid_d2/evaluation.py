"""Pick Detectron2's evaluator from a dataset's ``evaluator_type`` metadata."""
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator


def build_evaluator(cfg: CfgNode, dataset_name: str, output_dir: str) -> DatasetEvaluator:
    """COCO (boxes, masks, keypoints; tasks follow the predictions) or LVIS evaluator.

    Keypoint OKS sigmas come from ``TEST.KEYPOINT_OKS_SIGMAS`` or, if that is empty, from the
    dataset's ``keypoint_oks_sigmas`` metadata (needed for non-COCO keypoint sets).
    """
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type")
    max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
    if evaluator_type == "coco":
        sigmas = tuple(cfg.TEST.KEYPOINT_OKS_SIGMAS) or tuple(metadata.get("keypoint_oks_sigmas", ()))
        return COCOEvaluator(
            dataset_name,
            output_dir=output_dir,
            max_dets_per_image=max_dets,
            kpt_oks_sigmas=sigmas,
        )
    if evaluator_type == "lvis":
        return LVISEvaluator(dataset_name, output_dir=output_dir, max_dets_per_image=max_dets)
    raise ValueError(
        f"Dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; hybrid_d2 evaluates "
        "'coco' (boxes, masks, keypoints) and 'lvis' datasets"
    )
