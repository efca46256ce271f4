"""The frameworks beyond Mask R-CNN: RetinaNet's P6 source, each evaluator type, eval-only."""
import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.evaluation import inference_on_dataset
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Instances

import hybrid_d2
from conftest import REPO_ROOT, is_segmentation_config, load_config, run_script
from hybrid_d2.backbones import build_hybrid_retinanet_backbone
from hybrid_d2.data import DatasetMapper
from hybrid_d2.evaluation import build_evaluator

SHAPES_CONFIGS = sorted(
    p for p in (REPO_ROOT / "configs/shapes").glob("*.yaml")
    if not p.name.startswith("Base-") and not is_segmentation_config(p)
)
KEYPOINT_CONFIG = REPO_ROOT / "configs/shapes/mixformer_b1_keypoint_rcnn_shapes.yaml"
TINY_TEST = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128, "DATALOADER.NUM_WORKERS", 0]

# Overall metrics each evaluator reports, by task (COCOEvaluator / LVISEvaluator). APl is left
# out: shapes objects are at most 80 px, so there are no large ones (COCO: NaN, LVIS: -100).
COCO_METRICS = {"bbox": ["AP", "AP50", "AP75", "APs", "APm"], "segm": ["AP", "AP50", "AP75", "APs", "APm"],
                "keypoints": ["AP", "AP50", "AP75", "APm"]}
LVIS_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APr", "APc", "APf"]


def _expected_metrics(cfg) -> dict:
    tasks = ["bbox"] + ["segm"] * cfg.MODEL.MASK_ON + ["keypoints"] * cfg.MODEL.KEYPOINT_ON
    if cfg.DATASETS.TEST[0] == "shapes_lvis_val":
        return {task: LVIS_METRICS for task in tasks}
    return {task: COCO_METRICS[task] for task in tasks}


# --- RetinaNet's P6/P7 source ------------------------------------------------------------------


def _retinanet_cfg(top_block_in_feature, out_features=("res3", "res4", "res5")):
    cfg = get_cfg()
    hybrid_d2.add_hybrid_config(cfg)
    cfg.merge_from_list([
        "MODEL.FPN.BOTTOM_UP", "build_mixformer_backbone",
        "MODEL.MIXFORMER.VARIANT", "b0",  # res3/res4/res5: 48/96/192 channels
        "MODEL.MIXFORMER.OUT_FEATURES", list(out_features),
        "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.FPN.TOP_BLOCK_IN_FEATURE", top_block_in_feature,
    ])
    return cfg


@pytest.mark.parametrize("source, channels", [("res5", 192), ("p5", 32)])
def test_retinanet_p6_source(source, channels):
    fpn = build_hybrid_retinanet_backbone(_retinanet_cfg(source), ShapeSpec(channels=3)).eval()
    assert fpn.top_block.p6.in_channels == channels
    seen = []
    fpn.top_block.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outputs = fpn(image)
        expected = fpn.bottom_up(image)["res5"] if source == "res5" else outputs["p5"]
    assert torch.equal(seen[0], expected)
    assert {k: tuple(v.shape[1:]) for k, v in outputs.items()} == {
        "p3": (32, 8, 12), "p4": (32, 4, 6), "p5": (32, 2, 3), "p6": (32, 1, 2), "p7": (32, 1, 1),
    }


@pytest.mark.parametrize("source", ["res4", "p6", "c5"])
def test_retinanet_bad_p6_source_is_named(source):
    message = rf"MODEL.FPN.TOP_BLOCK_IN_FEATURE='{source}': expected 'res5' .* or 'p5'"
    with pytest.raises(ValueError, match=message):
        build_hybrid_retinanet_backbone(_retinanet_cfg(source), ShapeSpec(channels=3))


def test_bottom_up_outputs_the_fpn_does_not_read_are_refused():
    cfg = _retinanet_cfg("res5", out_features=("res2", "res3", "res4", "res5"))
    with pytest.raises(ValueError, match=r"outputs \['res2', 'res3', 'res4', 'res5'\].*MODEL.MIXFORMER.OUT_FEATURES"):
        build_hybrid_retinanet_backbone(cfg, ShapeSpec(channels=3))


# --- evaluators --------------------------------------------------------------------------------


def _ground_truth_as_predictions(record: dict, with_masks: bool) -> dict:
    """A dataset record's annotations as the model output a perfect detector would give."""
    image_size = (record["height"], record["width"])
    # As DatasetMapper prepares them, with no augmentation.
    annotations = [utils.transform_instance_annotations(a, T.TransformList([]), image_size) for a in record["annotations"]]
    gt = utils.annotations_to_instances(annotations, image_size, "bitmask")
    predictions = Instances(gt.image_size, pred_boxes=gt.gt_boxes, pred_classes=gt.gt_classes)
    predictions.scores = torch.ones(len(gt))
    if with_masks:
        predictions.pred_masks = gt.gt_masks.tensor
    if gt.has("gt_keypoints"):
        predictions.pred_keypoints = gt.gt_keypoints.tensor  # visibility as keypoint score
    return {"instances": predictions}


@pytest.mark.parametrize("path", SHAPES_CONFIGS, ids=[p.stem for p in SHAPES_CONFIGS])
def test_evaluator_scores_ground_truth_100(path, shapes_datasets, tmp_path):
    """build_evaluator on each framework's shapes val set: perfect predictions score AP 100.

    This checks what the evaluator is given (category mapping, OKS sigmas of the 6 shapes
    keypoints from the metadata, LVIS frequency groups, detections per image), not a model.
    """
    cfg = load_config(path)
    dataset = cfg.DATASETS.TEST[0]
    evaluator = build_evaluator(cfg, dataset, str(tmp_path))
    evaluator.reset()
    for record in DatasetCatalog.get(dataset):
        evaluator.process([record], [_ground_truth_as_predictions(record, cfg.MODEL.MASK_ON)])
    results = evaluator.evaluate()
    expected = _expected_metrics(cfg)
    assert sorted(results) == sorted(expected)
    for task, metrics in expected.items():
        assert {m: results[task][m] for m in metrics} == pytest.approx({m: 100.0 for m in metrics}), task


@pytest.mark.parametrize("path", SHAPES_CONFIGS, ids=[p.stem for p in SHAPES_CONFIGS])
def test_untrained_detector_is_evaluated(path, shapes_datasets, tmp_path):
    """Each framework's model output goes through its evaluator and gives finite metrics.

    A detector at initialisation scores every class about equally (R-CNN: 1 / (classes + 1);
    RetinaNet: its 0.01 prior, below the default 0.05 threshold), so the score thresholds are set
    to 0 so that every image has detections: without any, the metrics would be NaN. Four val
    images keep it short; the metrics are over the whole val set, hence small but finite.
    """
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, *TINY_TEST]
    cfg = load_config(path, opts)
    dataset = cfg.DATASETS.TEST[0]
    torch.manual_seed(0)
    model = build_model(cfg)
    loader = build_detection_test_loader(
        dataset=DatasetCatalog.get(dataset)[:4], mapper=DatasetMapper(cfg, is_train=False), num_workers=0
    )
    results = inference_on_dataset(model, loader, build_evaluator(cfg, dataset, str(tmp_path)))
    expected = _expected_metrics(cfg)
    assert sorted(results) == sorted(expected)
    for task, metrics in expected.items():
        assert all(math.isfinite(results[task][m]) for m in metrics), (task, results[task])


# --- eval-only ---------------------------------------------------------------------------------


def test_keypoint_eval_only_reproduces_the_final_evaluation(datasets_root, tmp_path):
    """A checkpoint saved by training, evaluated again with --eval-only, gives the same numbers."""
    opts = ["SOLVER.IMS_PER_BATCH", 2, "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", 128,
            "TEST.DETECTIONS_PER_IMAGE", 10, *TINY_TEST]
    train = run_script(
        "train_net.py",
        ["--config-file", KEYPOINT_CONFIG, *opts, "SOLVER.MAX_ITER", 2, "OUTPUT_DIR", tmp_path / "train"],
        datasets_root,
    )
    assert train.returncode == 0, train.stderr[-5000:]
    again = run_script(
        "train_net.py",
        ["--config-file", KEYPOINT_CONFIG, "--eval-only", *opts,
         "MODEL.WEIGHTS", tmp_path / "train" / "model_final.pth", "OUTPUT_DIR", tmp_path / "eval"],
        datasets_root,
    )
    assert again.returncode == 0, again.stderr[-5000:]

    def metrics(result):
        log = result.stdout + result.stderr
        return [line.split("copypaste: ")[1] for line in log.splitlines() if "copypaste: " in line]

    assert metrics(train)[::3] == ["Task: bbox", "Task: keypoints"]
    assert metrics(again) == metrics(train)
    predictions = Path("inference/shapes_keypoints_val/coco_instances_results.json")
    assert (tmp_path / "eval" / predictions).read_text() == (tmp_path / "train" / predictions).read_text()
