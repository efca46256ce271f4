from .build import backbone_layer_id, build_optimizer, get_param_groups, layer_decay_lr_factor

__all__ = ["backbone_layer_id", "build_optimizer", "get_param_groups", "layer_decay_lr_factor"]
