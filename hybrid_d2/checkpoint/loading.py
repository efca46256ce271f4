"""Read official checkpoints safely: PyTorch files and PaddlePaddle ``.pdparams`` pickles."""

import argparse
import os
import pickle
from typing import Any, Dict

import numpy as np
import torch

# Paddle's paddle.save adds this name -> parameter-name table next to the arrays.
_PADDLE_NAME_TABLE = "StructuredToParameterName@@"

# The only globals a pickle of {name: numpy array} needs; none of them runs arbitrary code.
# numpy >= 2 pickles name ``numpy._core``, older ones ``numpy.core``: both are read by either.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
    ("collections", "OrderedDict"),
}
_NUMPY_CORE = (
    "numpy._core" if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else "numpy.core"
)

# What official training scripts store next to the weights besides tensors and plain containers:
# DeiT/ConvNeXt-style ``main.py`` scripts (DilateFormer, Dynamic Mobile-Former) save their
# command line as an ``argparse.Namespace`` under ``args``. A Namespace only holds attributes.
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)


class CheckpointLoadError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and the reason."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        canonical = module.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(canonical.replace("numpy.core", _NUMPY_CORE, 1), name)


def load_numpy_pickle(path: str, expected: str) -> Any:
    """Unpickle a file that may only contain numpy arrays and plain containers (Paddle
    ``.pdparams``, Detectron2 model zoo ``.pkl``, Python 2 pickles included); ``expected`` names
    what the file should be, for the error raised when it needs more."""
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            if "is not allowed" not in str(e):
                raise CheckpointLoadError(
                    f"{path}: not a readable pickle ({_one_line(e)})"
                ) from e
            raise pickle.UnpicklingError(
                f"{path}: refusing to unpickle, it needs more than numpy arrays to load ({e}); "
                f"{expected} should be a pickled dict of numpy arrays"
            ) from e
        except (
            Exception
        ) as e:  # truncated, not a pickle, ...: one line that names the file
            raise CheckpointLoadError(
                f"{path}: cannot read {expected} ({type(e).__name__}: {_one_line(e)})"
            ) from e


def _load_torch(path: str) -> Any:
    """``torch.load(weights_only=True)``, also accepting ``SAFE_CHECKPOINT_GLOBALS``.

    Raises:
        pickle.UnpicklingError: the file needs other globals, which could run code.
        CheckpointLoadError: the file is not a PyTorch checkpoint (text, truncated, ...).
    """
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _weights_only_reason(str(e))
        if "global" not in reason.lower():
            raise CheckpointLoadError(
                f"{path}: not a PyTorch checkpoint ({reason})"
            ) from e
        raise pickle.UnpicklingError(
            f"{path}: refusing to load, it is not a plain tensor checkpoint and unpickling it "
            f"would run code ({reason})"
        ) from e
    except OSError:
        raise
    except (
        Exception
    ) as e:  # a text file, a truncated zip, ...: one line that names the file
        raise CheckpointLoadError(
            f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {_one_line(e)})"
        ) from e


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _weights_only_reason(message: str) -> str:
    """What torch's weights-only refusal says was refused, without its advice: the line naming a
    refused GLOBAL if there is one, else the "WeightsUnpickler error:" text."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:
            return (
                line.split("WeightsUnpickler error:")[-1]
                .strip()
                .split(". Please use")[0]
            )
    _, marker, after = message.partition("WeightsUnpickler error:")
    details = (
        [line.strip() for line in after.splitlines() if line.strip()] if marker else []
    )
    return (details or lines or [message])[0]


def _pick_state_dict(checkpoint: dict, path: str, use_ema: bool) -> dict:
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}"
        )
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


def read_torch_checkpoint(path: str) -> Any:
    """A whole PyTorch checkpoint (e.g. a timm training checkpoint), read with
    ``weights_only=True`` (plus ``argparse.Namespace``); a file that needs code is refused.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return _load_torch(path)


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
            raise ValueError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        tensors[name] = value
    return tensors
