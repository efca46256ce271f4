"""Poly / linear / cosine schedules of the ADE20K recipes and the multi-scale + flip test."""
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from torch import nn

from conftest import REPO_ROOT, load_config
from hybrid_d2.data import SemSegDatasetMapper
from hybrid_d2.segmentation import SemanticSegmentorWithTTA, tta_sizes
from hybrid_d2.solver import build_lr_scheduler

ADE20K = REPO_ROOT / "configs" / "ade20k"
UPERNET_SHAPES = REPO_ROOT / "configs/shapes/mixformer_b1_upernet_shapes.yaml"


def _lr_at(config: str, iterations):
    cfg = load_config(ADE20K / config)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    values = []
    for iteration in iterations:
        scheduler.last_epoch = iteration  # the iteration whose lr the schedule gives
        values.append(scheduler.get_lr()[0])
    return values


def test_swin_upernet_schedule_is_linear_warmup_then_linear_decay():
    """mmcv poly(power 1, min_lr 0) with linear warmup 1500 from 1e-6 (design note §5.5)."""
    got = _lr_at("mixformer_b1_upernet_160k.yaml", [0, 750, 1500, 80000, 160000])
    expected = [6e-11, 6e-5 * (1e-6 + (1 - 1e-6) * 0.5) * (1 - 750 / 160000), 5.94375e-5, 3e-5, 0.0]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_pvt_schedules_poly_and_cosine_without_warmup():
    assert _lr_at("dualformer_s_upernet_80k.yaml", [0, 40000]) == pytest.approx([1e-4, 1e-4 * 0.5**0.9])
    assert _lr_at("dmformer_s_semfpn_40k.yaml", [0, 20000, 40000]) == pytest.approx([2e-4, 2e-4 * 0.5**0.9, 0])
    cosine = _lr_at("dilateformer_s_semfpn_80k.yaml", [0, 20000, 40000, 80000])
    assert cosine == pytest.approx([2e-4, 2e-4 * (1 + math.cos(math.pi / 4)) / 2, 1e-4, 0], abs=1e-12)


def test_unknown_schedule_is_named():
    cfg = load_config(ADE20K / "mixformer_b1_upernet_160k.yaml", ["SOLVER.LR_SCHEDULER_NAME", "Poly"])
    with pytest.raises(ValueError, match=r"SOLVER.LR_SCHEDULER_NAME: expected one of .*'WarmupPolyLR'.*, got 'Poly'"):
        build_lr_scheduler(cfg, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))


def test_tta_sizes_are_mmsegs_ratios_of_512x2048():
    """mmseg: scale = min(2048 r / long, 512 r / short), sides rounded (int(x + 0.5))."""
    height, width = 512, 683  # a typical ADE20K validation image
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    expected = []
    for r in ratios:
        scale = min(2048 * r / max(height, width), 512 * r / min(height, width))
        expected.append((int(height * scale + 0.5), int(width * scale + 0.5)))
    assert tta_sizes(height, width, 512, 2048, ratios) == expected == [
        (256, 342), (384, 512), (512, 683), (640, 854), (768, 1025), (896, 1195)]
    assert tta_sizes(200, 1600, 512, 2048, (1.0,)) == [(256, 2048)]  # long side bound


class _PositionLogits(nn.Module):
    """Logits that depend only on a pixel's column at the output size: a flipped pass shows as a
    mirrored ramp once it is flipped back."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, inputs):
        (x,) = inputs
        self.calls.append((tuple(x["image"].shape[1:]), x["height"], x["width"]))
        ramp = torch.linspace(0, 3, x["width"]).expand(x["height"], -1)
        return [{"sem_seg": torch.stack([torch.zeros_like(ramp), ramp])}]


def test_tta_runs_every_scale_and_flip_from_the_original_and_averages_probabilities():
    cfg = load_config(UPERNET_SHAPES, ["TEST.AUG.RATIOS", (0.75, 1.0, 1.25)])
    model = _PositionLogits()
    image = torch.zeros((3, 100, 150), dtype=torch.uint8)
    (output,) = SemanticSegmentorWithTTA(cfg, model)([{"image": image, "height": 100, "width": 150}])
    sizes = [(60, 90), (80, 120), (100, 150)]  # ratios of (80, 320) from the original 100x150
    assert model.calls == [(size, 100, 150) for size in sizes for _ in range(2)]
    probabilities = model([{"image": image, "height": 100, "width": 150}])[0]["sem_seg"].softmax(0)
    # softmax probabilities (not logits) averaged, the flipped passes' flipped back
    torch.testing.assert_close(output["sem_seg"], (probabilities + probabilities.flip(-1)) / 2)


def test_tta_with_one_ratio_and_no_flip_is_the_single_scale_test(shapes_sem_seg_datasets):
    cfg = load_config(UPERNET_SHAPES, ["TEST.AUG.RATIOS", (1.0,), "TEST.AUG.FLIP", False])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    record = DatasetCatalog.get("shapes_sem_seg_val")[0]
    single = SemSegDatasetMapper(cfg, is_train=False)(record)
    original = SemSegDatasetMapper(cfg, is_train=False, augmentations=[])(record)
    assert tuple(original["image"].shape[1:]) == (record["height"], record["width"])
    with torch.no_grad():
        expected = model([single])[0]["sem_seg"].softmax(0)
        (got,) = SemanticSegmentorWithTTA(cfg, model)([original])
    torch.testing.assert_close(got["sem_seg"], expected)
