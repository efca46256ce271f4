"""A DetectionCheckpointer that never leaves a broken checkpoint and never runs pickled code."""

import logging
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import atomic_output, stale_temp_files
from .loading import _load_torch, load_numpy_pickle

__all__ = ["CheckpointMismatchError", "SafeCheckpointer"]

_LAST_CHECKPOINT = "last_checkpoint"
# State-dict keys of the backbone, whose shapes must match (see SafeCheckpointer._load_model).
_BACKBONE_PREFIX = "backbone."
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (another variant or architecture)."""


class SafeCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` with safe saving and loading.

    Saving:

    * a checkpoint is written to a temporary file in the same folder, fsynced and renamed
      (``atomic_output``); ``last_checkpoint`` is then replaced the same way, so it always names
      a complete file, even if the process is killed at any moment;
    * a model state with a non-finite floating tensor is refused (``FloatingPointError`` naming
      the tensors; nothing is written);
    * after :meth:`disable_saving` (the trainer calls it when training failed), ``save`` logs
      and writes nothing.

    Loading:

    * ``.pth`` (and pycls ``.pyth``) files are read with ``torch.load(weights_only=True)``
      (plus ``argparse.Namespace``, which official training scripts store as ``args``);
      Detectron2 / Caffe2 ``.pkl`` files with an unpickler that only rebuilds numpy arrays. A
      file that needs to run code is refused with an ``UnpicklingError`` naming it;
    * a backbone tensor whose shape differs from the model's, a backbone tensor the model does
      not have, or a numbered backbone block (``...blocks.3``) missing from a checkpoint that has
      its siblings, raise :class:`CheckpointMismatchError` listing them (expected vs got): such a
      checkpoint is for another variant (MixFormer-B1 weights into B2), which Detectron2 would
      only warn about and half-load. Head tensors keep Detectron2's behaviour (a warning, the
      model's init kept) so that fine-tuning to another number of classes works. When resuming
      (``load`` restoring the checkpointables, e.g. the trainer's state), any shape mismatch
      raises: a run resumes only from its own checkpoints;
    * ``num_batches_tracked`` counters of norms that the model builds without one (FrozenBN) are
      dropped: they carry no weights;
    * an unreadable file (text, truncated) raises a ``CheckpointLoadError`` naming it.
    """

    def __init__(self, model, save_dir: str = "", **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self._saving_disabled: Optional[str] = None
        self._resuming = False
        self._loading: Optional[str] = None

    # --- saving -----------------------------------------------------------------------------

    def disable_saving(self, reason: str) -> None:
        """Make every later ``save`` a logged no-op, e.g. after training failed."""
        self._saving_disabled = reason

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``{save_dir}/{name}.pth`` atomically, then point ``last_checkpoint`` at it.

        Raises:
            FloatingPointError: naming the model tensors with NaN/Inf values; nothing is written.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        basename = f"{name}.pth"
        if self._saving_disabled:
            self.logger.warning(f"Not saving {basename}: {self._saving_disabled}")
            return
        data = {"model": self.model.state_dict()}
        _check_finite(data["model"], basename)
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_output(save_file) as tmp_path:
            torch.save(data, tmp_path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically replace ``last_checkpoint`` with the name of a complete checkpoint."""
        with atomic_output(os.path.join(self.save_dir, _LAST_CHECKPOINT)) as tmp_path:
            with open(tmp_path, "w") as f:
                f.write(last_filename_basename)

    def remove_stale_temp_files(self) -> List[str]:
        """Delete the temporary checkpoint files a killed save left in ``save_dir``; return them.

        Call it from the main process before training (re)starts, when no save is running.
        """
        if not self.save_dir or not self.save_to_disk:
            return []
        stale = stale_temp_files(self.save_dir, "*.pth") + stale_temp_files(
            self.save_dir, _LAST_CHECKPOINT
        )
        for path in stale:
            os.unlink(path)
            self.logger.info(
                f"Removed {path}, left by a checkpoint save that was interrupted"
            )
        return stale

    # --- loading ----------------------------------------------------------------------------

    def load(
        self, path: str, checkpointables: Optional[List[str]] = None
    ) -> Dict[str, Any]:
        self._resuming = checkpointables is None and bool(self.checkpointables)
        self._loading = path
        try:
            return super().load(path, checkpointables=checkpointables)
        finally:
            self._resuming, self._loading = False, None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            return _model_zoo_checkpoint(
                load_numpy_pickle(filename, "a Detectron2 .pkl checkpoint"), filename
            )
        if filename.endswith(".pyth"):  # pycls, as Detectron2 reads it
            data = _load_torch(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise ValueError(
                    f"{filename}: a pycls .pyth checkpoint needs a 'model_state' entry"
                )
            model = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": model, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # calls _torch_load for everything else

    def read(self, path: str) -> Dict[str, Any]:
        """Read a local checkpoint file as :meth:`load` does, without loading it into the model
        (to check a file before anything else starts)."""
        self._parsed_url_during_load = urlparse(path)  # what load() sets for _load_file
        try:
            return self._load_file(path)
        finally:
            self._parsed_url_during_load = None

    def _torch_load(self, f: str) -> Dict[str, Any]:
        data = _load_torch(f)
        if not isinstance(data, dict):
            raise ValueError(
                f"{f}: expected a dict checkpoint, got {type(data).__name__}"
            )
        return data

    def _load_model(self, checkpoint: Any):
        model_keys = list(self.model.state_dict())
        _drop_foreign_batch_counters(checkpoint["model"], set(model_keys))
        incompatible = super()._load_model(checkpoint)
        problems = _mismatch_lines(
            incompatible, model_keys, strict_shapes=self._resuming
        )
        if problems:
            raise CheckpointMismatchError(
                f"{self._loading}: the checkpoint does not fit the model (another backbone "
                "variant?); Detectron2 would only warn and leave these tensors at their initial "
                "values:\n" + "\n".join(problems)
            )
        return incompatible


def _drop_foreign_batch_counters(
    state_dict: Dict[str, Any], model_keys: Set[str]
) -> None:
    """Remove the ``num_batches_tracked`` counters the model has no place for.

    A BatchNorm's counter only serves its momentum-free mode; weights trained with BatchNorm
    (official ImageNet checkpoints, a BN run of ours) carry one per norm, which a model built with
    FrozenBN (the detection default) does not have: loading must not report them as unexpected.
    """
    for key in [k for k in state_dict if k.endswith(".num_batches_tracked")]:
        if key not in model_keys and key.removeprefix("module.") not in model_keys:
            del state_dict[key]


def _check_finite(state_dict: Dict[str, torch.Tensor], basename: str) -> None:
    bad = [
        name
        for name, value in state_dict.items()
        if torch.is_tensor(value)
        and value.is_floating_point()
        and not torch.isfinite(value).all()
    ]
    if bad:
        listed = ", ".join(bad[:_MAX_LISTED]) + (
            ", ..." if len(bad) > _MAX_LISTED else ""
        )
        raise FloatingPointError(
            f"Refusing to save {basename}: {len(bad)} model tensors have NaN or Inf values: "
            + listed
        )


def _model_zoo_checkpoint(data: Any, path: str) -> Dict[str, Any]:
    """Detectron2's reading of a .pkl: a Detectron2 model zoo dict, or Caffe2 blobs."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    if "model" in data and "__author__" in data:
        logging.getLogger(__name__).info(f"Reading a file from '{data['__author__']}'")
        return data
    if "blobs" in data:
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


def _mismatch_lines(
    incompatible, model_keys: List[str], strict_shapes: bool
) -> List[str]:
    """The mismatches that make a checkpoint unfit (see SafeCheckpointer), one line each."""
    lines = [
        f"  {key}: expected shape {list(shape_model)}, got {list(shape_checkpoint)}"
        for key, shape_checkpoint, shape_model in incompatible.incorrect_shapes
        if strict_shapes or key.startswith(_BACKBONE_PREFIX)
    ]
    unexpected = sorted(
        k for k in incompatible.unexpected_keys if k.startswith(_BACKBONE_PREFIX)
    )
    lines += [
        f"  {key}: expected nothing (not in the model), got a tensor"
        for key in unexpected
    ]
    # torch's BatchNorm never reports a missing num_batches_tracked: not evidence of a load
    loaded = {k for k in model_keys if not k.endswith("num_batches_tracked")}
    loaded -= set(incompatible.missing_keys)
    for block, count in sorted(
        _missing_blocks(incompatible.missing_keys, loaded).items()
    ):
        lines.append(
            f"  {block}: expected {count} tensors, got none (the checkpoint has its siblings)"
        )
    if len(lines) > 3 * _MAX_LISTED:
        lines = lines[: 3 * _MAX_LISTED] + [
            f"  ... ({len(lines) - 3 * _MAX_LISTED} more)"
        ]
    return lines


def _missing_blocks(missing: List[str], loaded: Set[str]) -> Dict[str, int]:
    """Numbered backbone blocks (``parent.<i>``) that are entirely missing while the checkpoint
    has other blocks of the same ``parent``: the checkpoint's network is shallower."""
    loaded_blocks: Dict[str, Set[str]] = defaultdict(set)
    for key in loaded:
        for parent, index in _numbered_prefixes(key):
            loaded_blocks[parent].add(index)
    blocks: Dict[str, int] = defaultdict(int)
    for key in missing:
        if not key.startswith(_BACKBONE_PREFIX):
            continue
        for parent, index in _numbered_prefixes(key):
            if loaded_blocks[parent] and index not in loaded_blocks[parent]:
                blocks[f"{parent}.{index}"] += 1
                break
    return blocks


def _numbered_prefixes(key: str) -> List[Tuple[str, str]]:
    """(parent, index) of each numbered component: 'a.0.b.1.w' -> [('a', '0'), ('a.0.b', '1')]."""
    parts = key.split(".")
    return [
        (".".join(parts[:i]), part)
        for i, part in enumerate(parts[:-1])
        if i > 0 and part.isdigit()
    ]
