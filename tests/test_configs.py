"""Every shipped config loads, and the MixFormer detectors have the paper's sizes."""
import math
from pathlib import Path

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from fvcore.nn import parameter_count

import hybrid_d2
from hybrid_d2.config import merge_config_file

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
EXPERIMENTS = [c for c in CONFIGS if not c.name.startswith("Base-")]

# Mask R-CNN totals: paper Table 4 (millions) and the design note's exact count (§8 #6) of the
# official architecture with Detectron2's standard heads, plus our 4 output LayerNorms (2 * sum(C)).
MASK_RCNN_PARAMS = {
    "b1": (26e6, 26_305_549 + 2 * 480),
    "b2": (28e6, 28_312_520 + 2 * 480),
    "b3": (35e6, 35_062_824 + 2 * 720),
    "b4": (53e6, 53_009_932 + 2 * 960),
}


def _cfg(path):
    cfg = get_cfg()
    hybrid_d2.add_hybrid_config(cfg)
    merge_config_file(cfg, str(path), ["MODEL.DEVICE", "cpu"])
    return cfg


def test_import_registers_backbones_and_datasets():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in ("build_hybrid_fpn_backbone", "build_hybrid_retinanet_backbone", "build_mixformer_backbone"):
        assert name in BACKBONE_REGISTRY
    assert "shapes_train" in DatasetCatalog.list()
    assert MetadataCatalog.get("shapes_lvis_val").evaluator_type == "lvis"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[c.stem for c in EXPERIMENTS])
def test_experiment_config_loads(path):
    cfg = _cfg(path)
    assert cfg.MODEL.BACKBONE.NAME.startswith("build_hybrid_")
    assert cfg.MODEL.FPN.BOTTOM_UP in BACKBONE_REGISTRY


@pytest.mark.parametrize("variant", sorted(MASK_RCNN_PARAMS))
def test_mask_rcnn_parameter_counts(variant):
    paper, exact = MASK_RCNN_PARAMS[variant]
    path = Path(__file__).resolve().parents[1] / f"configs/mixformer_{variant}_mask_rcnn_1x.yaml"
    total = parameter_count(build_model(_cfg(path)))[""]
    assert total == exact
    assert math.isclose(total, paper, rel_tol=0.03)


def test_schedules_match_the_paper():
    root = Path(__file__).resolve().parents[1] / "configs"
    one_x, three_x = _cfg(root / "mixformer_b4_mask_rcnn_1x.yaml"), _cfg(root / "mixformer_b4_mask_rcnn_3x.yaml")
    assert (one_x.SOLVER.MAX_ITER, one_x.SOLVER.IMS_PER_BATCH, one_x.INPUT.MIN_SIZE_TRAIN) == (90000, 16, (800,))
    assert three_x.SOLVER.MAX_ITER == 270000
    assert (min(three_x.INPUT.MIN_SIZE_TRAIN), max(three_x.INPUT.MIN_SIZE_TRAIN)) == (480, 800)
    for cfg in (one_x, three_x):
        assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY) == ("AdamW", 1e-4, 0.05)
        assert cfg.MODEL.MIXFORMER.DROP_PATH_RATE == 0.2
