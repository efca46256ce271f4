"""The twelve ADE20K configs: each paper row's model size and recipe."""
import math
from pathlib import Path

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from fvcore.nn import parameter_count

from conftest import REPO_ROOT, load_config

ADE20K = REPO_ROOT / "configs" / "ade20k"
# config: (paper total params in millions, tolerance). DualFormer's rows get 10%: the paper's S
# total (48M) is below its own backbone (Table 1) plus the standard heads (docs/segmentation.md).
PAPER_PARAMS = {
    "mixformer_b1_upernet_160k": (35, 0.02),
    "mixformer_b2_upernet_160k": (37, 0.02),
    "mixformer_b3_upernet_160k": (44, 0.02),
    "mixformer_b4_upernet_160k": (63, 0.02),
    "dilateformer_s_upernet_160k": (54, 0.02),
    "dilateformer_b_upernet_160k": (79, 0.02),
    "dilateformer_s_semfpn_80k": (28, 0.02),
    "dilateformer_b_semfpn_80k": (51, 0.02),
    "dualformer_s_upernet_80k": (48, 0.10),
    "dualformer_b_upernet_80k": (104, 0.10),
    "dmformer_s_semfpn_40k": (30.4, 0.02),
    "dmformer_s_upernet_160k": (56.6, 0.02),
}
# (images per batch, AdamW lr, weight decay, schedule, poly power, warmup iterations) per recipe
SWIN_UPERNET = (16, 6e-5, 0.01, "WarmupPolyLR", 1.0, 1500)
RECIPES = {
    "mixformer": SWIN_UPERNET,
    "dilateformer_upernet": SWIN_UPERNET,
    "dilateformer_semfpn": (16, 2e-4, 1e-4, "WarmupCosineLR", None, 0),
    "dualformer": (32, 1e-4, 1e-4, "WarmupPolyLR", 0.9, 0),
    "dmformer_semfpn": (16, 2e-4, 1e-4, "WarmupPolyLR", 0.9, 0),
    "dmformer_upernet": SWIN_UPERNET,
}
HEADS = {"upernet": ("UperNetHead", "build_hybrid_bottom_up_backbone"),
         "semfpn": ("SemanticFPNHead", "build_hybrid_sem_seg_fpn_backbone")}


def _recipe(name: str):
    family, _, head, _ = name.split("_")
    return RECIPES.get(family) or RECIPES[f"{family}_{head}"]


def _build_on_meta(cfg):
    with torch.device("meta"):  # sizes only
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


def test_there_is_one_config_per_paper_row():
    assert sorted(p.stem for p in ADE20K.glob("[!B]*.yaml")) == sorted(PAPER_PARAMS)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_total_parameters_match_the_paper(name):
    """Every parameter, the auxiliary head included, as mmseg's get_flops counts them."""
    paper, tolerance = PAPER_PARAMS[name]
    model = _build_on_meta(load_config(ADE20K / f"{name}.yaml"))
    total = parameter_count(model)[""]
    assert math.isclose(total / 1e6, paper, rel_tol=tolerance), f"{name}: {total:,} vs {paper}M"


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_recipe_of_the_paper_row(name):
    cfg = load_config(ADE20K / f"{name}.yaml")
    family, variant, head, iters = name.split("_")
    batch, lr, weight_decay, schedule, power, warmup = _recipe(name)
    solver = cfg.SOLVER
    assert solver.MAX_ITER == int(iters[:-1]) * 1000
    assert (solver.OPTIMIZER, solver.IMS_PER_BATCH, solver.BASE_LR, solver.WEIGHT_DECAY) == ("AdamW", batch, lr, weight_decay)
    assert (solver.LR_SCHEDULER_NAME, solver.WARMUP_ITERS) == (schedule, warmup)
    if power is not None:
        assert solver.POLY_LR_POWER == power
    assert solver.CHECKPOINT_PERIOD == cfg.TEST.EVAL_PERIOD == solver.MAX_ITER // 10
    assert (cfg.MODEL.SEM_SEG_HEAD.NAME, cfg.MODEL.BACKBONE.NAME) == HEADS[head]
    assert cfg.MODEL.FPN.BOTTOM_UP == f"build_{family}_backbone"
    assert (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE) == (150, 255)
    assert cfg.MODEL.SEM_SEG_HEAD.AUX.ENABLED == (head == "upernet")
    # mmseg's ADE20K pipeline (design note §3)
    data = cfg.INPUT
    assert (data.MIN_SIZE_TRAIN, data.MAX_SIZE_TRAIN, data.RESIZE_RATIO_RANGE) == ((512,), 2048, (0.5, 2.0))
    assert (data.CROP.ENABLED, data.CROP.TYPE, tuple(data.CROP.SIZE), data.CROP.SINGLE_CATEGORY_MAX_AREA) == (True, "absolute", (512, 512), 0.75)
    assert (data.RANDOM_FLIP, data.COLOR_AUG_SSD, data.FORMAT) == ("horizontal", True, "RGB")
    assert (data.MIN_SIZE_TEST, data.MAX_SIZE_TEST) == (512, 2048)
    assert (cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.FLIP, cfg.TEST.AUG.RATIOS) == (True, True, (0.5, 0.75, 1.0, 1.25, 1.5, 1.75))
    assert cfg.DATASETS.TRAIN == ("ade20k_sem_seg_train",) and cfg.DATASETS.TEST == ("ade20k_sem_seg_val",)
    assert not cfg.DATALOADER.ASPECT_RATIO_GROUPING


def test_ambiguous_choices_are_written_in_the_configs():
    for name in ("dilateformer_s_semfpn_80k", "dualformer_s_upernet_80k", "dmformer_s_semfpn_40k"):
        assert "Ambiguity:" in (ADE20K / f"{name}.yaml").read_text(), name
