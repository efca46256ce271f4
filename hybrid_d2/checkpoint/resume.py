"""What exact resuming needs besides the checkpoint: per-iteration seeding of the model's RNGs."""

import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.resumable import STEP, derive_seed

__all__ = ["StepSeeder", "seed_step"]


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
