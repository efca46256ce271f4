"""Early, readable errors for datasets whose files are missing."""

import difflib
import os
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog

from .shapes import ensure_shapes_dataset, is_shapes_dataset

__all__ = ["check_dataset_files", "missing_dataset_files"]

# Metadata keys under which Detectron2's dataset registrations record files and folders.
_PATH_KEYS = (
    "json_file",
    "image_root",
    "panoptic_json",
    "panoptic_root",
    "sem_seg_root",
    "image_dir",
    "gt_dir",
    "dirname",
)


def _check_registered(dataset_name: str) -> None:
    registered = DatasetCatalog.list()
    if dataset_name not in registered:
        similar = difflib.get_close_matches(dataset_name, registered, n=5, cutoff=0.5)
        raise KeyError(
            f"Dataset '{dataset_name}' is not registered. Similar registered names: "
            f"{', '.join(similar) or 'none'}."
        )


def missing_dataset_files(dataset_name: str) -> List[str]:
    """
    The files and folders recorded in a registered dataset's metadata that do not exist, as
    "key: path" strings. Shapes datasets are generated (or checked) instead.

    Raises:
        KeyError: if the dataset is not registered.
    """
    _check_registered(dataset_name)
    if is_shapes_dataset(dataset_name):
        ensure_shapes_dataset(dataset_name)
        return []
    metadata = MetadataCatalog.get(dataset_name)
    paths = {key: metadata.get(key) for key in _PATH_KEYS if metadata.get(key)}
    return [f"{key}: {path}" for key, path in paths.items() if not os.path.exists(path)]


def _datasets_root_description() -> str:
    root = os.getenv("DETECTRON2_DATASETS")
    if root is None:
        return f"DETECTRON2_DATASETS is not set, so the root is 'datasets' under {os.getcwd()}"
    return f"DETECTRON2_DATASETS={root} ({os.path.abspath(os.path.expanduser(root))})"


def check_dataset_files(dataset_name: str) -> None:
    """
    Raise a clear error before training or evaluation if a dataset's files are missing.

    Checks the paths in the dataset's metadata (json_file, image_root, ...), as recorded by
    Detectron2's COCO/LVIS registrations, including its builtin datasets. Shapes datasets are
    generated if absent.

    Raises:
        KeyError: if the dataset is not registered (with similar registered names).
        FileNotFoundError: naming the dataset and each missing path.
    """
    missing = missing_dataset_files(dataset_name)
    if missing:
        raise FileNotFoundError(
            f"Dataset '{dataset_name}' is missing files:\n  "
            + "\n  ".join(missing)
            + f"\n{_datasets_root_description()} (read when detectron2 / hybrid_d2.data was "
            "imported). See datasets/README.md for the expected layout."
        )
