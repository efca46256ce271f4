"""What exact resuming needs besides the weights, optimizer and scheduler: per-iteration seeding of
the model's RNGs, and the running statistics a model keeps outside its state dict."""

import logging
import random
from typing import Dict, List

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.utils import comm
from torch import nn

from ..data.resumable import STEP, derive_seed

__all__ = [
    "RunningStateGatherer",
    "StepSeeder",
    "load_running_state",
    "restore_running_states",
    "running_state",
    "seed_step",
]

logger = logging.getLogger(__name__)

# Plain attributes (not buffers) that Detectron2's models update as they train: the EMA of the
# number of foreground anchors that RetinaNet and FCOS divide their losses by
# (DenseDetector._ema_update("loss_normalizer", ...)).
_RUNNING_ATTRIBUTE_PREFIX = "loss_normalizer"


def seed_step(seed: int, rank: int, iteration: int) -> None:
    """Seed python's, numpy's and torch's (CPU, CUDA) global RNGs from (seed, rank, iteration)."""
    step_seed = derive_seed(seed, STEP, rank, iteration)
    random.seed(step_seed)
    np.random.seed(step_seed % 2**32)
    torch.manual_seed(step_seed)


class StepSeeder(HookBase):
    """Before each iteration, seed the global RNGs from (trainer.seed, rank, iteration).

    The randomness of a step (drop path, RPN / ROI sampling) is then a function of its iteration,
    so that a run resumed from a checkpoint draws what the uninterrupted run drew. Register it
    first, so that no other hook's ``before_step`` runs between the seeding and the step.
    """

    def before_step(self):
        seed_step(self.trainer.seed, comm.get_rank(), self.trainer.iter)


def running_state(model: nn.Module) -> Dict[str, float]:
    """The running attributes of the model's dense detectors, by ``module_name.attribute``.

    Detectron2 keeps them outside the state dict and each process has its own (they follow the
    process's own images), so a checkpoint needs every rank's to resume exactly.
    """
    state = {}
    for module_name, module in model.named_modules():
        if isinstance(module, DenseDetector):
            for name, value in vars(module).items():
                if name.startswith(_RUNNING_ATTRIBUTE_PREFIX) and isinstance(
                    value, (int, float)
                ):
                    state[f"{module_name}.{name}".lstrip(".")] = float(value)
    return state


def load_running_state(model: nn.Module, state: Dict[str, float]) -> None:
    """Set the attributes that :func:`running_state` returned."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        module_name, _, name = key.rpartition(".")
        module = modules.get(module_name)
        if not isinstance(module, DenseDetector):
            raise KeyError(
                f"running state {key!r}: the model has no dense detector {module_name!r}"
            )
        setattr(module, name, value)


class RunningStateGatherer(HookBase):
    """After each iteration that ends in a checkpoint, gather every rank's :func:`running_state`
    into ``trainer.running_states`` (a list by rank), which the trainer saves.

    Register it on every rank (the gathering is collective) and before the checkpointer hook. The
    iterations are the ones ``PeriodicCheckpointer`` saves after: every ``period``-th and the last.
    """

    def __init__(self, period: int, max_iter: int):
        self._period = period
        self._max_iter = max_iter

    def after_step(self):
        iteration = self.trainer.iter
        if (iteration + 1) % self._period == 0 or iteration >= self._max_iter - 1:
            self.trainer.running_states = comm.all_gather(
                running_state(self.trainer.model)
            )


def restore_running_states(model: nn.Module, states: List[Dict[str, float]]) -> None:
    """Give this rank its entry of a checkpoint's per-rank running states."""
    rank, world_size = comm.get_rank(), comm.get_world_size()
    if len(states) != world_size:
        logger.warning(
            f"The checkpoint's running statistics are from {len(states)} processes, this run has "
            f"{world_size}: process {rank} continues with those of process "
            f"{min(rank, len(states) - 1)}, so the losses differ from an uninterrupted run."
        )
    load_running_state(model, states[min(rank, len(states) - 1)])
