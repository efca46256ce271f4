"""Optimizer parameter groups and layer-wise lr decay."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from torch import nn

from hybrid_d2 import add_hybrid_config
from hybrid_d2.solver import backbone_layer_id, build_optimizer, get_param_groups


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = ChannelsFirstLayerNorm(4)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.fc = nn.Linear(4, 2)


def _decay_of(groups, param):
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group["weight_decay"]


def test_no_weight_decay_on_norms_biases_and_tables():
    net = _Net()
    groups = get_param_groups(
        net, base_lr=1e-4, weight_decay=0.05, weight_decay_norm=0.0, weight_decay_bias=0.0,
        no_weight_decay_keys=["relative_position_bias_table"],
    )
    assert _decay_of(groups, net.conv.weight) == 0.05
    assert _decay_of(groups, net.fc.weight) == 0.05
    for p in (net.conv.bias, net.fc.bias, net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias,
              net.relative_position_bias_table):
        assert _decay_of(groups, p) == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_layer_id_follows_stages_and_blocks():
    depths = (1, 2, 6, 6)
    last = sum(depths) + 1
    assert backbone_layer_id("backbone.bottom_up.net.patch_embed.proj.weight", depths) == 0
    assert backbone_layer_id("backbone.bottom_up.net.layers.0.blocks.0.attn.qkv.weight", depths) == 1
    assert backbone_layer_id("backbone.bottom_up.net.layers.1.blocks.1.mlp.fc1.weight", depths) == 3
    # the merge after stage 0 feeds the first block of stage 1
    assert backbone_layer_id("backbone.bottom_up.net.layers.0.downsample.reduction.weight", depths) == 2
    assert backbone_layer_id("backbone.bottom_up.net.layers.3.blocks.5.norm1.weight", depths) == last - 1
    assert backbone_layer_id("backbone.bottom_up.output_norms.res2.weight", depths) == last
    assert backbone_layer_id("roi_heads.box_predictor.cls_score.weight", depths) == last


def test_unknown_optimizer_is_refused():
    cfg = get_cfg()
    add_hybrid_config(cfg)
    cfg.SOLVER.OPTIMIZER = "Adam"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='Adam'"):
        build_optimizer(cfg, _Net())


def _shapes_cfg(*opts):
    from conftest import SHAPES_CONFIG
    from hybrid_d2.config import merge_config_file

    cfg = get_cfg()
    add_hybrid_config(cfg)
    merge_config_file(cfg, str(SHAPES_CONFIG), list(opts))
    return cfg


def test_layer_decay_on_a_mixformer_mask_rcnn():
    from detectron2.modeling import build_model

    cfg = _shapes_cfg("SOLVER.LAYER_DECAY.ENABLED", True, "SOLVER.LAYER_DECAY.RATE", 0.5)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    base = cfg.SOLVER.BASE_LR
    num_layers = sum(model.backbone.bottom_up.depths) + 1  # b1: 16
    stem = model.backbone.bottom_up.net.patch_embed.proj.weight
    first_block = model.backbone.bottom_up.net.layers[0].blocks[0].attn.qkv.weight
    head = model.roi_heads.box_predictor.cls_score.weight
    assert lr_of[id(stem)] == pytest.approx(base * 0.5**num_layers)
    assert lr_of[id(first_block)] == pytest.approx(base * 0.5 ** (num_layers - 1))
    assert lr_of[id(head)] == pytest.approx(base)


def test_full_model_gradient_clipping_bounds_the_step():
    cfg = _shapes_cfg(
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", 1.0, "SOLVER.MOMENTUM", 0.0,
        "SOLVER.WEIGHT_DECAY", 0.0, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.5,
    )
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    net = _Net()
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)
    build_optimizer(cfg, net).step()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.5, rel=1e-4)
