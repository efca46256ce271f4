"""Early, readable errors for datasets whose files are missing or whose records Detectron2 would
choke on (or silently fix) during training."""

import difflib
import logging
import numbers
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.structures import BoxMode

from .sem_seg import LabelError, check_label_values, read_label
from .shapes import ensure_shapes_dataset, is_shapes_dataset

__all__ = [
    "check_dataset_dicts",
    "check_sem_seg_dataset_dicts",
    "is_sem_seg_dataset",
    "check_dataset_files",
    "load_detection_dataset_dicts",
    "missing_dataset_files",
]

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
        converted = any(
            path.startswith("sem_seg_root:") and "annotations_detectron2" in path
            for path in missing
        )
        hint = (
            " ADE20K's annotations_detectron2/ is written by datasets/prepare_ade20k_sem_seg.py."
            if converted
            else ""
        )
        raise FileNotFoundError(
            f"Dataset '{dataset_name}' is missing files:\n  "
            + "\n  ".join(missing)
            + f"\n{_datasets_root_description()} (read when detectron2 / hybrid_d2.data was "
            f"imported). See datasets/README.md for the expected layout.{hint}"
        )


# --- dataset dicts ---------------------------------------------------------------------------

_NUM_CLASSES_KEYS = (
    "MODEL.ROI_HEADS.NUM_CLASSES (R-CNN) / MODEL.RETINANET.NUM_CLASSES (RetinaNet)"
)
# Label files of a semantic segmentation dataset read at start (all are checked as they are read).
_LABELS_CHECKED_AT_START = 8
# Detectron2's filter_empty_instances drops boxes whose side is not larger than this.
_EMPTY_BOX_SIDE = 1e-5
_MAX_LISTED = 10


def _metadata(dataset_name: str) -> dict:
    """The metadata of a registered dataset as a dict ({} if it is not registered)."""
    if dataset_name not in DatasetCatalog:
        return {}
    return MetadataCatalog.get(dataset_name).as_dict()


def _describe(dataset_names: Sequence[str]) -> str:
    """Name the datasets with their json files: dataset 'a' (a.json) / datasets 'a' (...), 'b'."""
    parts = []
    for name in dataset_names:
        json_file = _metadata(name).get("json_file")
        parts.append(f"'{name}'" + (f" ({json_file})" if json_file else ""))
    return ("dataset " if len(parts) == 1 else "datasets ") + ", ".join(parts)


def _failing_dataset(
    dataset_names: Sequence[str], error: BaseException
) -> Optional[str]:
    """The first of ``dataset_names`` whose own loading (``DatasetCatalog.get``) raises an error
    of ``error``'s type; None if none does alone."""
    for name in dataset_names:
        try:
            DatasetCatalog.get(name)
        except type(error):
            return name
    return None


def _source(dataset_name: str) -> str:
    """dataset 'a' from a.json, or dataset 'a' without a json file."""
    json_file = _metadata(dataset_name).get("json_file")
    return f"dataset '{dataset_name}'" + (f" from {json_file}" if json_file else "")


def _error_detail(error: BaseException) -> str:
    """A loader error's message; a bare KeyError(key) becomes a sentence."""
    detail = error.args[0] if error.args else ""
    if not isinstance(error, KeyError) or (isinstance(detail, str) and " " in detail):
        return str(error)
    if isinstance(detail, numbers.Integral):  # LVIS loader's COCO-id mapping
        return f"category_id={detail} is not in the dataset's categories"
    return f"an image or annotation entry has no key {detail!r}"


def load_detection_dataset_dicts(dataset_names: Sequence[str], **kwargs) -> List[dict]:
    """``detectron2.data.get_detection_dataset_dicts`` (same keyword arguments), with errors that
    name the dataset and its json file.

    Detectron2's COCO/LVIS loaders raise a bare KeyError for an annotation whose category_id is not
    in the json's "categories" or an image entry without "height"/"width", and AssertionErrors
    without the json file; both become a ValueError naming the dataset (the first whose own
    ``DatasetCatalog.get`` fails the same way) and its json file. So does the AssertionError for a
    dataset that Detectron2's filters leave without images.
    """
    try:
        return get_detection_dataset_dicts(list(dataset_names), **kwargs)
    except (KeyError, AssertionError) as error:
        if str(error).startswith("No valid data found"):
            raise ValueError(_no_records_message(dataset_names)) from error
        if any(name not in DatasetCatalog for name in dataset_names):
            raise  # Detectron2's KeyError names the unknown dataset and the registered ones
        name = _failing_dataset(dataset_names, error)
        source = _source(name) if name else _describe(dataset_names)
        raise ValueError(f"Cannot load {source}: {_error_detail(error)}") from error


def _no_records_message(dataset_names: Sequence[str]) -> str:
    return (
        f"No training images left in {_describe(dataset_names)}. Detectron2 removes the images "
        "without non-crowd annotations (DATALOADER.FILTER_EMPTY_ANNOTATIONS) and those with too "
        "few keypoints (MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE); check the annotation "
        "files."
    )


def _training_annotations(record: dict) -> List[dict]:
    """The annotations that reach the model: Detectron2's DatasetMapper drops crowd ones."""
    return [ann for ann in record.get("annotations", ()) if not ann.get("iscrowd", 0)]


def _check_not_empty(dataset_dicts: List[dict], dataset_names: Sequence[str]) -> None:
    if not dataset_dicts:
        raise ValueError(_no_records_message(dataset_names))
    if not any(_training_annotations(record) for record in dataset_dicts):
        raise ValueError(
            f"None of the {len(dataset_dicts)} images of {_describe(dataset_names)} has a "
            "non-crowd annotation: there is nothing to train on. Check the annotation files."
        )


def _check_image_files(dataset_dicts: List[dict], dataset_names: Sequence[str]) -> None:
    missing = [
        str(record.get("file_name"))
        for record in dataset_dicts
        if not record.get("file_name") or not os.path.exists(record["file_name"])
    ]
    if missing:
        listed = "\n  ".join(missing[:_MAX_LISTED]) + (
            "\n  ..." if len(missing) > _MAX_LISTED else ""
        )
        raise FileNotFoundError(
            f"{len(missing)} of the {len(dataset_dicts)} images of {_describe(dataset_names)} do "
            f"not exist:\n  {listed}\n{_datasets_root_description()}."
        )


def _check_image_sizes(
    dataset_dicts: List[dict], dataset_names: Sequence[str], required: bool = True
) -> None:
    for record in dataset_dicts:
        size = {key: record.get(key) for key in ("height", "width")}
        if not required and size == {"height": None, "width": None}:
            continue
        if any(not isinstance(v, numbers.Integral) or v <= 0 for v in size.values()):
            raise ValueError(
                f"Image {record.get('file_name')} of {_describe(dataset_names)}: expected positive "
                f"integer 'height' and 'width' in its record, got {size}."
            )


def _is_class_id(category_id, num_classes: int) -> bool:
    return (
        isinstance(category_id, numbers.Real)
        and float(category_id).is_integer()
        and 0 <= category_id < num_classes
    )


def _check_categories(
    dataset_dicts: List[dict], dataset_names: Sequence[str], num_classes: int
) -> None:
    bad_ids, example, count = set(), None, 0
    for record in dataset_dicts:
        for ann in _training_annotations(record):
            category_id = ann.get("category_id")
            if not _is_class_id(category_id, num_classes):
                bad_ids.add(category_id)
                example = example or record.get("file_name")
                count += 1
    if not bad_ids:
        return
    ids = sorted(
        bad_ids, key=lambda v: (0, v) if isinstance(v, numbers.Real) else (1, repr(v))
    )
    shown = ", ".join(map(repr, ids[:20])) + (", ..." if len(ids) > 20 else "")
    classes = (
        _metadata(dataset_names[0]).get("thing_classes") if dataset_names else None
    )
    known = (
        f" The dataset's metadata lists {len(classes)} thing_classes."
        if classes
        else ""
    )
    raise ValueError(
        f"{count} annotations of {_describe(dataset_names)} have a category_id outside "
        f"[0, {num_classes}) (ids after Detectron2's mapping to contiguous ids): {shown}; e.g. in "
        f"{example}.{known} Set {_NUM_CLASSES_KEYS} to the dataset's number of classes."
    )


def _grouped_boxes(
    dataset_dicts: List[dict], dataset_names: Sequence[str]
) -> Dict[BoxMode, Tuple[list, list]]:
    """box mode -> (bboxes, index of each bbox's record), over the training annotations."""
    groups: Dict[BoxMode, Tuple[list, list]] = defaultdict(lambda: ([], []))
    for i, record in enumerate(dataset_dicts):
        for ann in _training_annotations(record):
            if "bbox" not in ann or "bbox_mode" not in ann:
                raise ValueError(
                    f"An annotation of image {record.get('file_name')} of "
                    f"{_describe(dataset_names)} lacks 'bbox' or 'bbox_mode': {ann}"
                )
            mode = BoxMode(ann["bbox_mode"])
            if mode in (BoxMode.XYXY_REL, BoxMode.XYWH_REL):
                raise ValueError(
                    f"Image {record.get('file_name')} of {_describe(dataset_names)} has a box in "
                    f"{mode.name}; Detectron2 supports absolute box modes only."
                )
            if len(ann["bbox"]) != (5 if mode == BoxMode.XYWHA_ABS else 4):
                raise ValueError(
                    f"Image {record.get('file_name')} of {_describe(dataset_names)} has a "
                    f"{mode.name} box with {len(ann['bbox'])} values: {ann['bbox']}"
                )
            bboxes, owners = groups[mode]
            bboxes.append(ann["bbox"])
            owners.append(i)
    return groups


def _xyxy_boxes(
    dataset_dicts: List[dict], dataset_names: Sequence[str]
) -> Tuple[np.ndarray, np.ndarray]:
    """(N, 4) XYXY_ABS boxes of the training annotations and the index of each box's record.

    Raises:
        ValueError: naming the image and the box, for a box with a non-finite coordinate.
    """
    all_boxes, all_owners = [np.zeros((0, 4))], [np.zeros(0, dtype=int)]
    for mode, (bboxes, owners) in _grouped_boxes(dataset_dicts, dataset_names).items():
        try:
            boxes = np.asarray(bboxes, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{_describe(dataset_names)} has non-numeric {mode.name} boxes: {error}"
            ) from error
        finite = np.isfinite(boxes).all(axis=1)
        if not finite.all():
            first = int(np.argmin(finite))
            raise ValueError(
                f"{int((~finite).sum())} boxes of {_describe(dataset_names)} have non-finite "
                f"coordinates, e.g. {bboxes[first]} ({mode.name}) in image "
                f"{dataset_dicts[owners[first]].get('file_name')}. Detectron2 would silently "
                "drop or clip them; fix the annotations."
            )
        all_boxes.append(BoxMode.convert(boxes, mode, BoxMode.XYXY_ABS))
        all_owners.append(np.asarray(owners))
    return np.concatenate(all_boxes), np.concatenate(all_owners)


def _log_box_fixes(
    dataset_dicts: List[dict], dataset_names: Sequence[str], logger: logging.Logger
) -> None:
    """Warn about the boxes Detectron2's mapper will clip, drop or reorder."""
    boxes, owners = _xyxy_boxes(dataset_dicts, dataset_names)
    sizes = np.array(
        [(r["width"], r["height"]) for r in dataset_dicts], dtype=np.float64
    )
    limits = np.tile(sizes[owners], 2)  # (w, h, w, h) per box
    reversed_ = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    # box transforms take the min/max corners (fvcore Transform.apply_box)
    boxes = np.concatenate(
        [
            np.minimum(boxes[:, :2], boxes[:, 2:]),
            np.maximum(boxes[:, :2], boxes[:, 2:]),
        ],
        axis=1,
    )
    clipped = np.clip(boxes, 0, limits)
    outside = (clipped != boxes).any(axis=1)
    empty = ((clipped[:, 2:] - clipped[:, :2]) <= _EMPTY_BOX_SIDE).any(axis=1)
    num_clipped, num_dropped = int((outside & ~empty).sum()), int(empty.sum())
    num_reversed = int((reversed_ & ~empty).sum())
    if not (num_clipped or num_dropped or num_reversed):
        return
    reversed_text = (
        f"; {num_reversed} boxes have negative width or height and will be kept with their "
        "corners swapped"
        if num_reversed
        else ""
    )
    logger.warning(
        f"{_describe(dataset_names)}: {num_clipped} boxes extend outside their image and will be "
        f"clipped; {num_dropped} boxes have zero area (after clipping) and will be dropped"
        f"{reversed_text}, as Detectron2 does."
    )


def is_sem_seg_dataset(dataset_dicts: List[dict]) -> bool:
    """Whether records are semantic segmentation records (a ``sem_seg_file_name``, no
    ``annotations``), as Detectron2's ``load_sem_seg`` returns."""
    return bool(dataset_dicts) and all(
        "sem_seg_file_name" in record and "annotations" not in record
        for record in dataset_dicts
    )


def _check_label_files(
    dataset_dicts: List[dict],
    dataset_names: Sequence[str],
    num_classes: int,
    ignore_value: int,
) -> None:
    """Every label file exists; the first few hold only class ids and the ignore value."""
    missing = [
        str(record["sem_seg_file_name"])
        for record in dataset_dicts
        if not os.path.exists(record["sem_seg_file_name"])
    ]
    if missing:
        listed = "\n  ".join(missing[:_MAX_LISTED]) + (
            "\n  ..." if len(missing) > _MAX_LISTED else ""
        )
        raise FileNotFoundError(
            f"{len(missing)} of the {len(dataset_dicts)} label files of {_describe(dataset_names)} "
            f"do not exist:\n  {listed}\n{_datasets_root_description()}."
        )
    for record in dataset_dicts[:_LABELS_CHECKED_AT_START]:
        path = record["sem_seg_file_name"]
        try:
            check_label_values(read_label(path), path, num_classes, ignore_value)
        except LabelError as error:
            raise LabelError(f"{_describe(dataset_names)}: {error}") from None


def check_sem_seg_dataset_dicts(
    dataset_dicts: List[dict],
    dataset_names: Sequence[str],
    num_classes: int,
    ignore_value: int,
) -> None:
    """Check the training records of semantic segmentation datasets before training starts:
    records exist; every image and label file exists; height/width, where given, are positive
    integers; the first few labels hold only ids in [0, num_classes) and ``ignore_value`` (the
    training mapper checks every label, and its size against the image, as it reads it).

    Raises:
        ValueError: no records, or a bad height/width (naming the image).
        FileNotFoundError: missing images or label files (the count and the first 10 paths).
        LabelError: a label value outside the classes, naming the dataset and the file.
    """
    dataset_names = list(dataset_names)
    if not dataset_dicts:
        raise ValueError(_no_records_message(dataset_names))
    _check_image_files(dataset_dicts, dataset_names)
    _check_label_files(dataset_dicts, dataset_names, num_classes, ignore_value)
    _check_image_sizes(dataset_dicts, dataset_names, required=False)


def check_dataset_dicts(
    dataset_dicts: List[dict],
    dataset_names: Sequence[str],
    num_classes: int,
    logger: Optional[logging.Logger] = None,
) -> None:
    """Check the training records of detection datasets before training starts.

    ``dataset_dicts`` is what ``get_detection_dataset_dicts(dataset_names)`` (or
    ``load_detection_dataset_dicts``) returns. Crowd annotations are not checked: Detectron2's
    DatasetMapper drops them before training. Refuses, in this order:

    * an empty list, or records without any non-crowd annotation (ValueError);
    * images that do not exist (FileNotFoundError: the count and the first 10 paths);
    * records without positive integer height/width (ValueError naming the image);
    * category ids outside [0, num_classes) (ValueError: the ids, an image, the config keys);
    * annotations without bbox/bbox_mode, relative box modes, non-finite coordinates (ValueError).

    Then logs one warning with the boxes Detectron2 will fix: those extending outside their image
    (clipped), those of zero area after clipping (dropped), those of negative width or height
    (corners swapped). A clean dataset logs nothing.

    Args:
        num_classes: the model's number of classes (MODEL.ROI_HEADS.NUM_CLASSES or
            MODEL.RETINANET.NUM_CLASSES).
        logger: where the warning goes; by default this module's logger.
    """
    dataset_names = list(dataset_names)
    _check_not_empty(dataset_dicts, dataset_names)
    _check_image_files(dataset_dicts, dataset_names)
    _check_image_sizes(dataset_dicts, dataset_names)
    _check_categories(dataset_dicts, dataset_names, num_classes)
    _log_box_fixes(dataset_dicts, dataset_names, logger or logging.getLogger(__name__))
