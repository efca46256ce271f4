"""Loading and converting official checkpoints of the backbone families; safe training
checkpoints and exact resuming."""

from .checkpointer import CheckpointMismatchError, SafeCheckpointer
from .dilateformer import convert_dilateformer
from .dmf import convert_dmf
from .loading import CheckpointLoadError, load_checkpoint_file, read_torch_checkpoint
from .mixformer import convert_mixformer
from .timm_classifier import CLASSIFIERS, convert_timm_checkpoint
from .resume import RunningStateGatherer, StepSeeder, restore_running_states, seed_step

# family name -> converter(official_state_dict, variant, keep_head=False)
#   -> (state_dict, dropped_keys)
CONVERTERS = {
    "dilateformer": convert_dilateformer,
    "dmf": convert_dmf,
    "mixformer": convert_mixformer,
}

__all__ = [
    "CLASSIFIERS",
    "CONVERTERS",
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
