"""Loading and converting official checkpoints of the backbone families."""

from .dilateformer import convert_dilateformer
from .loading import load_checkpoint_file
from .mixformer import convert_mixformer

# family name -> converter(official_state_dict, variant) -> (state_dict, dropped_keys)
CONVERTERS = {"dilateformer": convert_dilateformer, "mixformer": convert_mixformer}

__all__ = ["CONVERTERS", "convert_dilateformer", "convert_mixformer", "load_checkpoint_file"]
