"""Semantic segmentation data: label files checked as they are read, and the dataset mapper with
mmsegmentation's ADE20K training pipeline (resize by a random ratio -> crop where no class covers
more than a fraction -> flip -> photometric distortion -> pad to the crop size)."""

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image

from .mapper import ImageReadError, _describe_unreadable

__all__ = [
    "LabelError",
    "RandomRatioResize",
    "SemSegDatasetMapper",
    "build_sem_seg_train_augmentations",
    "check_label_values",
    "label_size",
    "read_label",
]

# PIL modes of an 8-bit single-channel label PNG (ADE20K's are "L"; palette PNGs store indices).
_LABEL_MODES = ("L", "P")


class LabelError(ValueError):
    """A semantic segmentation label file that cannot be used; the message names the file."""


def _open_label(path: str) -> Image.Image:
    try:
        with PathManager.open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except FileNotFoundError:
        raise LabelError(f"label file {path} does not exist") from None
    except (OSError, SyntaxError) as e:
        raise LabelError(
            f"label file {path} cannot be decoded ({type(e).__name__}: {e})"
        ) from e
    if image.mode not in _LABEL_MODES:
        raise LabelError(
            f"label file {path}: expected an 8-bit single-channel PNG (mode L or P), got mode "
            f"{image.mode}"
        )
    return image


def read_label(path: str) -> np.ndarray:
    """A label PNG as a (H, W) uint8 array of class ids, read without any conversion."""
    return np.asarray(_open_label(path), dtype=np.uint8)


def label_size(path: str) -> Tuple[int, int]:
    """(height, width) of a label file, from its header."""
    try:
        with PathManager.open(path, "rb") as f:
            width, height = Image.open(f).size
    except FileNotFoundError:
        raise LabelError(f"label file {path} does not exist") from None
    except (OSError, SyntaxError) as e:
        raise LabelError(
            f"label file {path} cannot be decoded ({type(e).__name__}: {e})"
        ) from e
    return height, width


def check_label_values(
    label: np.ndarray, path: str, num_classes: int, ignore_value: int
) -> None:
    """Raise LabelError unless every value is a class id in [0, num_classes) or ignore_value."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != ignore_value)]
    if len(bad):
        shown = ", ".join(map(str, bad[:10].tolist())) + (
            ", ..." if len(bad) > 10 else ""
        )
        raise LabelError(
            f"label file {path}: values {shown} are neither a class id in [0, {num_classes - 1}] "
            f"(MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes}) nor the ignore value {ignore_value}; "
            "raw ADE20K labels (0 = unlabelled, 1-150) need datasets/prepare_ade20k_sem_seg.py"
        )


class RandomRatioResize(T.Augmentation):
    """mmseg's ``Resize(img_scale=(long, short), ratio_range=...)``: a ratio r drawn uniformly
    from ``ratio_range``, then a resize keeping the aspect ratio to the largest size whose short
    side is at most ``short * r`` and long side at most ``long * r`` (labels: nearest).
    """

    def __init__(self, short: int, long: int, ratio_range: Sequence[float]):
        super().__init__()
        low, high = ratio_range
        if not 0 < low <= high:
            raise ValueError(
                f"INPUT.RESIZE_RATIO_RANGE: expected 0 < low <= high, got {ratio_range}"
            )
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        ratio = np.random.uniform(*self.ratio_range)
        height, width = image.shape[:2]
        new_height, new_width = T.ResizeShortestEdge.get_output_shape(
            height, width, self.short * ratio, self.long * ratio
        )
        return T.ResizeTransform(height, width, new_height, new_width)


def build_sem_seg_train_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """Resize, category-constrained crop, flip, photometric distortion, in mmseg's order."""
    augmentations = [
        RandomRatioResize(
            cfg.INPUT.MIN_SIZE_TRAIN[0],
            cfg.INPUT.MAX_SIZE_TRAIN,
            cfg.INPUT.RESIZE_RATIO_RANGE,
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augmentations.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.RANDOM_FLIP != "none":
        augmentations.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    if cfg.INPUT.COLOR_AUG_SSD:
        from detectron2.projects.point_rend import ColorAugSSDTransform

        augmentations.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    return augmentations


def _pad_to(array: np.ndarray, size: Tuple[int, int], value) -> np.ndarray:
    """Pad the bottom and right of an (H, W[, C]) array up to ``size`` (mmseg's Pad)."""
    pad_h, pad_w = max(size[0] - array.shape[0], 0), max(size[1] - array.shape[1], 0)
    if not (pad_h or pad_w):
        return array
    padded = np.empty(
        (array.shape[0] + pad_h, array.shape[1] + pad_w) + array.shape[2:], array.dtype
    )
    padded[...] = np.asarray(value, dtype=array.dtype)
    padded[: array.shape[0], : array.shape[1]] = array
    return padded


class SemSegDatasetMapper:
    """Map a semantic segmentation record (``file_name``, ``sem_seg_file_name``) to the input of
    Detectron2's ``SemanticSegmentor``.

    Training: image and label are read, checked (label values in [0, NUM_CLASSES) or
    IGNORE_VALUE, same size as the image, which must match the record's height/width), augmented by
    :func:`build_sem_seg_train_augmentations`, and, with a crop, padded up to the crop size: the
    image with the pixel mean (0 once normalised, as mmseg pads after normalising), the label with
    IGNORE_VALUE. Test: the image is resized to short side MIN_SIZE_TEST, long side at most
    MAX_SIZE_TEST; the label's size is checked from its header and the label is left to the
    evaluator. ``height``/``width`` are the original image's (the output size). ``augmentations``
    replaces the resize (training: the whole pipeline), e.g. ``[]`` for the original image.

    Raises:
        ImageReadError: an image that is missing, empty or corrupt.
        LabelError: a missing or undecodable label, a label of another size than its image, or
            a label value outside the classes (training; the evaluator checks them at test time).
    """

    def __init__(
        self,
        cfg: CfgNode,
        is_train: bool = True,
        augmentations: Optional[List[T.Augmentation]] = None,
    ):
        self.is_train = is_train
        self.image_format = cfg.INPUT.FORMAT
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        if augmentations is None and is_train:
            augmentations = build_sem_seg_train_augmentations(cfg)
        elif augmentations is None:
            augmentations = [
                T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
            ]
        self.augmentations = T.AugmentationList(augmentations)
        crop = cfg.INPUT.CROP
        self.pad_size: Optional[Tuple[int, int]] = None
        if is_train and crop.ENABLED and crop.TYPE == "absolute":
            self.pad_size = (int(crop.SIZE[0]), int(crop.SIZE[1]))
        # PIXEL_MEAN is in INPUT.FORMAT's channel order, as the model normalises with it.
        self.pad_pixel = np.asarray(cfg.MODEL.PIXEL_MEAN, dtype=np.float64).round()

    def _read_image(self, record: Dict[str, Any]) -> np.ndarray:
        try:
            image = utils.read_image(record["file_name"], format=self.image_format)
        except (OSError, SyntaxError) as error:
            raise ImageReadError(_describe_unreadable(record, error)) from error
        height, width = image.shape[:2]
        expected = (record.get("height", height), record.get("width", width))
        if expected != (height, width):
            raise ImageReadError(
                f"Image {record['file_name']} is {height}x{width} (HxW) but its record says "
                f"{expected[0]}x{expected[1]}"
            )
        return image

    def _check_label_size(
        self, label_file: str, label_hw: Tuple[int, int], image: np.ndarray
    ):
        if tuple(label_hw) != image.shape[:2]:
            raise LabelError(
                f"label file {label_file} is {label_hw[0]}x{label_hw[1]} (HxW) but its image is "
                f"{image.shape[0]}x{image.shape[1]}"
            )

    def __call__(self, record: Dict[str, Any]) -> Dict[str, Any]:
        record = copy.deepcopy(record)
        image = self._read_image(record)
        record["height"], record["width"] = image.shape[:2]
        label_file = record.pop("sem_seg_file_name", None)
        label = None
        if label_file is not None and self.is_train:
            label = read_label(label_file)
            self._check_label_size(label_file, label.shape, image)
            check_label_values(label, label_file, self.num_classes, self.ignore_value)
        elif label_file is not None:
            self._check_label_size(label_file, label_size(label_file), image)
        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        image, label = aug_input.image, aug_input.sem_seg
        if self.pad_size is not None:
            image = _pad_to(image, self.pad_size, self.pad_pixel)
            label = (
                _pad_to(label, self.pad_size, self.ignore_value)
                if label is not None
                else None
            )
        record["image"] = torch.as_tensor(
            np.ascontiguousarray(image.transpose(2, 0, 1))
        )
        if label is not None:
            record["sem_seg"] = torch.as_tensor(label.astype(np.int64))
        return record
