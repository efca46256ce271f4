"""Learning-rate schedules: Detectron2's, plus the poly schedule of the segmentation recipes."""

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_lr_scheduler as build_d2_lr_scheduler

__all__ = ["LR_SCHEDULERS", "build_lr_scheduler"]

LR_SCHEDULERS = (
    "WarmupMultiStepLR",
    "WarmupCosineLR",
    "WarmupStepWithFixedGammaLR",
    "WarmupPolyLR",
)


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer):
    """The schedule named by ``SOLVER.LR_SCHEDULER_NAME``.

    "WarmupPolyLR" is Detectron2's DeepLab project scheduler: ``base_lr * warmup(i) *
    (1 - i / MAX_ITER) ** SOLVER.POLY_LR_POWER`` with linear warmup from ``WARMUP_FACTOR`` over
    ``WARMUP_ITERS`` iterations, which is mmcv's ``poly`` policy with ``warmup='linear'`` and
    ``min_lr=0``; the others are Detectron2's core schedules.
    """
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    if name not in LR_SCHEDULERS:
        raise ValueError(
            f"SOLVER.LR_SCHEDULER_NAME: expected one of {LR_SCHEDULERS}, got {name!r}"
        )
    if name != "WarmupPolyLR":
        return build_d2_lr_scheduler(cfg, optimizer)
    try:
        from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR
    except ImportError as e:
        raise ImportError(
            "SOLVER.LR_SCHEDULER_NAME='WarmupPolyLR' needs detectron2.projects.deeplab, which this "
            f"Detectron2 installation lacks ({e}); install Detectron2 with its projects"
        ) from e
    return WarmupPolyLR(
        optimizer,
        cfg.SOLVER.MAX_ITER,
        warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
        warmup_iters=cfg.SOLVER.WARMUP_ITERS,
        warmup_method=cfg.SOLVER.WARMUP_METHOD,
        power=cfg.SOLVER.POLY_LR_POWER,
        constant_ending=cfg.SOLVER.POLY_LR_CONSTANT_ENDING,
    )
