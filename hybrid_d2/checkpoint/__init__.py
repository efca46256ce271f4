"""Loading and converting official checkpoints of the backbone families; safe training
checkpoints and exact resuming."""

from .checkpointer import CheckpointMismatchError, SafeCheckpointer
from .dilateformer import convert_dilateformer
from .dmf import convert_dmf
from .loading import CheckpointLoadError, load_checkpoint_file
from .mixformer import convert_mixformer
from .resume import RunningStateGatherer, StepSeeder, restore_running_states, seed_step

# family name -> converter(official_state_dict, variant) -> (state_dict, dropped_keys)
CONVERTERS = {
    "dilateformer": convert_dilateformer,
    "dmf": convert_dmf,
    "mixformer": convert_mixformer,
}

__all__ = [
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
    "load_checkpoint_file",
    "seed_step",
]
