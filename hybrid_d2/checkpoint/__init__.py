"""Loading and converting official checkpoints of the backbone families."""

from .loading import load_checkpoint_file
from .mixformer import convert_mixformer

# family name -> converter(official_state_dict, variant) -> (state_dict, dropped_keys)
CONVERTERS = {"mixformer": convert_mixformer}

__all__ = ["CONVERTERS", "convert_mixformer", "load_checkpoint_file"]
