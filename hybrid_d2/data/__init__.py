"""Datasets, dataset checks and the dataset mapper of hybrid_d2."""

from .guards import check_dataset_files, missing_dataset_files
from .mapper import DatasetMapper, ImageReadError
from .sem_seg import LabelError, SemSegDatasetMapper
from .shapes import (
    SHAPES_DATASET_NAMES,
    SHAPES_SEM_SEG_DATASET_NAMES,
    IncompleteDatasetError,
    ensure_shapes_dataset,
    is_shapes_dataset,
    register_shapes_datasets,
)

register_shapes_datasets()  # registration only: files are generated on first use

__all__ = [
    "DatasetMapper",
    "ImageReadError",
    "IncompleteDatasetError",
    "LabelError",
    "SHAPES_DATASET_NAMES",
    "SHAPES_SEM_SEG_DATASET_NAMES",
    "SemSegDatasetMapper",
    "check_dataset_files",
    "ensure_shapes_dataset",
    "is_shapes_dataset",
    "missing_dataset_files",
    "register_shapes_datasets",
]
