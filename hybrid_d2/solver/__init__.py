from .build import (
    backbone_layer_id,
    build_optimizer,
    get_param_groups,
    layer_decay_lr_factor,
)
from .schedule import LR_SCHEDULERS, build_lr_scheduler

__all__ = [
    "LR_SCHEDULERS",
    "backbone_layer_id",
    "build_lr_scheduler",
    "build_optimizer",
    "get_param_groups",
    "layer_decay_lr_factor",
]
