"""Loading and converting official checkpoints of the backbone families (each family's converter,
``hybrid_d2.checkpoint.<family>``, is named by its declaration: ``BackboneFamily.converter``);
safe training checkpoints and exact resuming."""

from .checkpointer import CheckpointMismatchError, SafeCheckpointer
from .dilateformer import convert_dilateformer
from .dmf import convert_dmf
from .loading import CheckpointLoadError, load_checkpoint_file, read_torch_checkpoint
from .mixformer import convert_mixformer
from .timm_classifier import convert_timm_checkpoint
from .resume import RunningStateGatherer, StepSeeder, restore_running_states, seed_step

__all__ = [
    "CheckpointLoadError",
    "CheckpointMismatchError",
    "SafeCheckpointer",
    "RunningStateGatherer",
    "StepSeeder",
    "restore_running_states",
    "convert_dilateformer",
    "convert_dmf",
    "convert_mixformer",
    "convert_timm_checkpoint",
    "load_checkpoint_file",
    "read_torch_checkpoint",
    "seed_step",
]
