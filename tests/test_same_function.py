"""The speed work (#25) changed how the networks compute, not what: one shipped config per family
computes the outputs and parameter gradients recorded before it, in float64, where a changed
order of summation moves results by ~1e-15 relative and any change of function by far more.

Record (with the code whose function is the reference):
    python tests/test_same_function.py tests/data/family_gradients_before_speedup.json
"""

import json
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from detectron2.modeling import build_backbone

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD = REPO_ROOT / "tests/data/family_gradients_before_speedup.json"
CONFIGS = {
    "mixformer": "configs/mixformer_b1_mask_rcnn_1x.yaml",
    "dilateformer": "configs/dilateformer_t_mask_rcnn_1x.yaml",
    "dualformer": "configs/dualformer_t_mask_rcnn_1x.yaml",
    "dmf": "configs/dmf_xxs_retinanet_1x.yaml",
    "dmformer": "configs/dmformer_s_mask_rcnn_1x.yaml",
}


def fingerprint(family: str) -> Dict[str, dict]:
    """The backbone of ``family``'s config in train mode (batch statistics, drop path off), in
    float64 on a 2x3x64x96 batch: each output's sum and absolute sum, and for each parameter its
    gradient of a random linear function of the outputs, projected on a seeded random tensor,
    and its absolute sum."""
    from hybrid_d2 import get_config

    cfg = get_config(str(REPO_ROOT / CONFIGS[family]))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    backbone = build_backbone(cfg).double().train()
    for module in backbone.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outputs = backbone(x)
    weights = torch.Generator().manual_seed(2)
    loss = sum(
        (value * torch.randn(value.shape, generator=weights, dtype=torch.float64)).sum()
        for _, value in sorted(outputs.items())
    )
    loss.backward()
    outputs = {k: v.detach() for k, v in outputs.items()}
    projections = torch.Generator().manual_seed(3)
    grads = {}
    for name, param in backbone.named_parameters():
        if param.grad is not None:
            direction = torch.randn(param.shape, generator=projections, dtype=torch.float64)
            grads[name] = [float((param.grad * direction).sum()), float(param.grad.abs().sum())]
    return {
        "outputs": {k: [float(v.sum()), float(v.abs().sum())] for k, v in outputs.items()},
        "grads": grads,
    }


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_outputs_and_gradients_are_those_recorded_before_the_speedup(family):
    before = json.loads(RECORD.read_text())[family]
    got = fingerprint(family)
    assert sorted(got["outputs"]) == sorted(before["outputs"])
    for name, (total, abs_total) in got["outputs"].items():
        assert abs_total == pytest.approx(before["outputs"][name][1], rel=1e-9), name
        assert total == pytest.approx(before["outputs"][name][0], abs=1e-9 * abs_total), name
    assert sorted(got["grads"]) == sorted(before["grads"])
    # a bias before a batch-statistics BatchNorm has a gradient of 0 plus round-off: tolerances
    # are relative to the parameter's gradient or, when that is ~0, to the largest one
    largest = max(abs_total for _, abs_total in before["grads"].values())
    for name, (projection, abs_total) in got["grads"].items():
        expected_projection, expected_abs_total = before["grads"][name]
        tolerance = 1e-9 * max(expected_abs_total, 1e-6 * largest)
        assert abs_total == pytest.approx(expected_abs_total, abs=tolerance), name
        assert projection == pytest.approx(expected_projection, abs=tolerance), name


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    Path(sys.argv[1]).write_text(json.dumps({f: fingerprint(f) for f in CONFIGS}, indent=0) + "\n")
