"""Read official checkpoints safely: PyTorch files and PaddlePaddle ``.pdparams`` pickles."""

import os
import pickle
from typing import Any, Dict

import numpy as np
import torch

# Paddle's paddle.save adds this name -> parameter-name table next to the arrays.
_PADDLE_NAME_TABLE = "StructuredToParameterName@@"

# The only globals a pickle of {name: numpy array} needs; none of them runs arbitrary code.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
    ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def load_numpy_pickle(path: str, expected: str) -> Any:
    """Unpickle a file that may only contain numpy arrays and plain containers (Paddle
    ``.pdparams``, Detectron2 model zoo ``.pkl``, Python 2 pickles included); ``expected`` names
    what the file should be, for the error raised when it needs more."""
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(
                f"{path}: refusing to unpickle, it needs more than numpy arrays to load ({e}); "
                f"{expected} should be a pickled dict of numpy arrays"
            ) from e


def _load_torch(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        reason = next(
            (line for line in lines if "global" in line.lower()), lines[0] if lines else ""
        )
        raise pickle.UnpicklingError(
            f"{path}: refusing to load, it is not a plain tensor checkpoint and unpickling it "
            f"would run code ({reason})"
        ) from e


def _pick_state_dict(checkpoint: dict, path: str, use_ema: bool) -> dict:
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    if use_ema:
        if "model_ema" not in checkpoint:
            raise KeyError(
                f"{path}: no 'model_ema' entry; top-level keys: {sorted(checkpoint)[:20]}"
            )
        return checkpoint["model_ema"]
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def load_checkpoint_file(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Load a state dict of tensors from a PyTorch file or a Paddle ``.pdparams`` file.

    PyTorch files are read with ``weights_only=True``; ``.pdparams`` files with an unpickler that
    only rebuilds numpy arrays. Either way a file that would need to run code is refused. The state
    dict is taken from a 'model' or 'state_dict' entry if there is one, or from 'model_ema' when
    ``use_ema``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".pdparams"):
        checkpoint = load_numpy_pickle(path, "a .pdparams file")
    else:
        checkpoint = _load_torch(path)
    state_dict = _pick_state_dict(checkpoint, path, use_ema)
    tensors = {}
    for name, value in state_dict.items():
        if name == _PADDLE_NAME_TABLE:
            continue
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        tensors[name] = value
    return tensors
