"""AdamW with the transformer recipe: parameter groups, layer-wise lr decay, gradient clipping."""

import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups
from torch import nn

NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    ChannelsFirstLayerNorm,
)

_BLOCK = re.compile(r"\.(?:layers|stages)\.(\d+)\.blocks\.(\d+)\.")
_MERGE = re.compile(r"\.(?:layers|stages)\.(\d+)\.downsample\.")
_STEM = re.compile(r"\.(?:patch_embed|stem)\.")


def backbone_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer index of a parameter for layer-wise lr decay (0 = stem, sum(depths) + 1 = heads).

    Block j of stage i is layer ``1 + sum(depths[:i]) + j``; the downsampling after stage i
    belongs to the first block of stage i + 1; other backbone parameters (output norms) and
    every parameter outside ``backbone.bottom_up`` take the last layer, i.e. the full lr.
    """
    num_layers = sum(depths) + 1
    if not name.startswith("backbone.bottom_up."):
        return num_layers
    if _STEM.search(name):
        return 0
    block = _BLOCK.search(name)
    if block:
        stage, index = int(block.group(1)), int(block.group(2))
        return 1 + sum(depths[:stage]) + index
    merge = _MERGE.search(name)
    if merge:
        return 1 + sum(depths[: int(merge.group(1)) + 1])
    return num_layers


def layer_decay_lr_factor(depths: Sequence[int], rate: float) -> Callable[[str], float]:
    """lr multiplier ``rate ** (num_layers - layer_id)`` as a function of the parameter name."""
    num_layers = sum(depths) + 1
    return lambda name: rate ** (num_layers - backbone_layer_id(name, depths))


def get_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_bias: float,
    no_weight_decay_keys: Sequence[str] = (),
    lr_factor_func: Optional[Callable[[str], float]] = None,
) -> List[Dict[str, Any]]:
    """One group per (lr, weight decay): norms, biases and the named tables get their own decay."""
    no_decay = set(no_weight_decay_keys)
    params: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            full_name = f"{module_name}.{local_name}" if module_name else local_name
            decay = weight_decay
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            elif local_name == "bias":
                decay = weight_decay_bias
            if local_name in no_decay:
                decay = 0.0
            lr = base_lr * (lr_factor_func(full_name) if lr_factor_func else 1.0)
            params.append({"params": [param], "lr": lr, "weight_decay": decay})
    return reduce_param_groups(params)


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer named by ``SOLVER.OPTIMIZER`` ("AdamW" or "SGD") from cfg.SOLVER."""
    solver = cfg.SOLVER
    lr_factor_func = None
    if solver.LAYER_DECAY.ENABLED:
        bottom_up = getattr(_unwrap(model).backbone, "bottom_up", None)
        depths = getattr(bottom_up, "depths", None)
        if depths is None:
            raise ValueError(
                "SOLVER.LAYER_DECAY.ENABLED needs a backbone.bottom_up with a `depths` attribute; "
                f"got {type(bottom_up).__name__}"
            )
        lr_factor_func = layer_decay_lr_factor(depths, solver.LAYER_DECAY.RATE)
    weight_decay_bias = (
        solver.WEIGHT_DECAY
        if solver.WEIGHT_DECAY_BIAS is None
        else solver.WEIGHT_DECAY_BIAS
    )
    params = get_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_bias=weight_decay_bias,
        no_weight_decay_keys=solver.NO_WEIGHT_DECAY_KEYS,
        lr_factor_func=lr_factor_func,
    )
    if solver.OPTIMIZER == "AdamW":
        return _with_gradient_clipping(cfg, torch.optim.AdamW)(
            params, lr=solver.BASE_LR, betas=tuple(solver.BETAS)
        )
    if solver.OPTIMIZER == "SGD":
        return _with_gradient_clipping(cfg, torch.optim.SGD)(
            params,
            lr=solver.BASE_LR,
            momentum=solver.MOMENTUM,
            nesterov=solver.NESTEROV,
        )
    raise ValueError(
        f"SOLVER.OPTIMIZER={solver.OPTIMIZER!r}: expected 'AdamW' or 'SGD'"
    )


def _with_gradient_clipping(cfg: CfgNode, optimizer_type: type) -> type:
    """Detectron2's per-parameter clipping ("value", "norm"), plus "full_model": one L2 norm
    over all gradients, as in the Swin / Mask2Former recipes."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return maybe_add_gradient_clipping(cfg, optimizer_type)

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optimizer_type.step(self, closure)

    return type(
        optimizer_type.__name__ + "WithFullModelGradientClip",
        (optimizer_type,),
        {"step": step},
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module
        if isinstance(model, nn.parallel.DistributedDataParallel)
        else model
    )
