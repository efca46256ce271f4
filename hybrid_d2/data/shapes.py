"""
Small procedurally generated "shapes" datasets for fast CPU training and tests.

Three datasets, each with a "train" and a "val" split, are generated on first use under
``$DETECTRON2_DATASETS`` (default ``datasets/``, relative to the working directory like
Detectron2's builtin datasets):

* ``shapes/``           COCO instances: circle, square, triangle, star, hexagon.
* ``shapes_keypoints/`` COCO keypoints: upright stars with 6 named keypoints, among
  unlabelled clutter shapes.
* ``shapes_lvis/``      LVIS v1: 8 shape categories with a long-tailed frequency.
* ``shapes_sem_seg/``   semantic segmentation in the exact ADEChallengeData2016 layout
  (``images/{training,validation}/*.jpg``, raw labels ``annotations/.../*.png`` with ADE's
  0 = unlabelled, and ``annotations_detectron2/`` written from them by the ADE20K conversion):
  background and the 5 shapes; object boundaries and "cross" clutter shapes are unlabelled, so
  that the ignore value 255 reaches the loss, the crop, the padding and the evaluation.

Generation is deterministic (seeded per image) and atomic: a dataset is written to a temporary
folder next to its target and renamed into place once complete; ``MANIFEST.json``, written
last, marks a complete dataset.
"""

import functools
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import (
    load_lvis_json,
    load_sem_seg,
    register_coco_instances,
    register_lvis_instances,
)

from .ade20k import ADE20K_SPLITS, CONVERTED_DIR, RAW_DIR, convert_ade20k_annotations

__all__ = [
    "IncompleteDatasetError",
    "SHAPES_DATASET_NAMES",
    "SHAPES_SEM_SEG_DATASET_NAMES",
    "SPLIT_SIZES",
    "ensure_shapes_dataset",
    "is_shapes_dataset",
    "register_shapes_datasets",
]

FORMAT_VERSION = 1
SPLIT_SIZES = {"train": 240, "val": 48}
IMAGE_SIDE_RANGE = (128, 192)
OBJECTS_PER_IMAGE = (2, 5)
OBJECT_SIZE_RANGE = (16, 80)
STAR_SIZE_RANGE = (28, 80)
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 48
MIN_COMPONENT_PIXELS = 8
MAX_PLACEMENT_TRIES = 10
MANIFEST_NAME = "MANIFEST.json"

SHAPE_CATEGORIES = ["circle", "square", "triangle", "star", "hexagon"]
LVIS_CATEGORIES = SHAPE_CATEGORIES + ["pentagon", "ellipse", "cross"]
# Long-tailed category sampling weights of shapes_lvis (same order as LVIS_CATEGORIES).
LVIS_CATEGORY_WEIGHTS = [6.0, 6.0, 6.0, 2.5, 2.5, 2.5, 0.6, 0.6]
# LVIS v1 calls a category rare up to 10 and common up to 100 of ~100k training images;
# with a few hundred images we use fractions of the training images instead.
LVIS_RARE_MAX_IMAGE_FRACTION = 0.15
LVIS_COMMON_MAX_IMAGE_FRACTION = 0.40
LVIS_NEGATIVE_PROBABILITY = 0.5

CATEGORY_COLORS = {
    "circle": [220, 20, 60],
    "square": [0, 130, 200],
    "triangle": [60, 180, 75],
    "star": [255, 200, 0],
    "hexagon": [145, 30, 180],
    "pentagon": [245, 130, 48],
    "ellipse": [70, 240, 240],
    "cross": [240, 50, 230],
}

# shapes_sem_seg: ADE-style raw label values are 0 (unlabelled), then 1 + the index in this list.
SEM_SEG_CLASSES = ["background"] + SHAPE_CATEGORIES
SEM_SEG_COLORS = [[120, 120, 120]] + [CATEGORY_COLORS[c] for c in SHAPE_CATEGORIES]
SEM_SEG_CLUTTER = "cross"  # drawn, left unlabelled
SEM_SEG_CLUTTER_PER_IMAGE = (0, 2)
SEM_SEG_OBJECTS_PER_IMAGE = (3, 6)
SEM_SEG_OBJECT_SIZE_RANGE = (32, 96)
SEM_SEG_IGNORE_VALUE = 255

KEYPOINT_CATEGORY = "star"
KEYPOINT_DISTRACTORS = ["circle", "square", "triangle", "hexagon"]
# Star tips clockwise from the top (viewer's left/right), then the centre.
KEYPOINT_NAMES = (
    "top",
    "upper_right",
    "lower_right",
    "lower_left",
    "upper_left",
    "center",
)
KEYPOINT_FLIP_MAP = (("upper_left", "upper_right"), ("lower_left", "lower_right"))
KEYPOINT_CONNECTION_RULES = [
    ("center", "top", (60, 180, 75)),
    ("center", "upper_right", (230, 25, 75)),
    ("center", "lower_right", (230, 25, 75)),
    ("center", "lower_left", (0, 130, 200)),
    ("center", "upper_left", (0, 130, 200)),
]
# Tips are sharp and easy to localise; the centre of a star is less so.
KEYPOINT_OKS_SIGMAS = [0.05, 0.05, 0.05, 0.05, 0.05, 0.08]
# Stars keep their tips identifiable (the 5-fold symmetry repeats every 72 degrees).
UPRIGHT_MAX_ROTATION = np.deg2rad(30.0)
STAR_INNER_RADIUS = 0.45


class IncompleteDatasetError(FileNotFoundError):
    """A dataset folder exists but is not a complete generated shapes dataset."""


# ---------------------------------------------------------------- geometry and rendering


def _regular_outline(num_vertices: int) -> np.ndarray:
    angles = -np.pi / 2 + 2 * np.pi * np.arange(num_vertices) / num_vertices
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star_outline() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RADIUS)
    return _regular_outline(10) * radii[:, None]


def _cross_outline() -> np.ndarray:
    a, b = 0.3, 1.0  # half width of the arms, half length
    # fmt: off
    return np.array([
        [-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
        [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a],
    ])
    # fmt: on


# Outlines centred at the origin with unit "radius"; vertices in clockwise order on screen.
_UNIT_OUTLINES = {
    "circle": _regular_outline(32),
    "square": _regular_outline(4),
    "triangle": _regular_outline(3),
    "star": _star_outline(),
    "hexagon": _regular_outline(6),
    "pentagon": _regular_outline(5),
    "ellipse": _regular_outline(32) * [1.0, 0.55],
    "cross": _cross_outline(),
}


@dataclass(frozen=True)
class _ObjectSpec:
    category: str
    annotated: bool = True
    upright: bool = False
    size_range: Tuple[int, int] = OBJECT_SIZE_RANGE


@dataclass(frozen=True)
class _PlacedObject:
    spec: _ObjectSpec
    index: int  # value of this object in the instance-id map
    center: np.ndarray
    outline: np.ndarray  # int32 (N, 2) vertices in pixel indices
    drawn: np.ndarray  # bool (H, W), the whole shape clipped to the image


@dataclass(frozen=True)
class _RenderedImage:
    image: np.ndarray  # uint8 BGR
    id_map: np.ndarray  # int32, 0 = background, k = k-th placed object (drawing order)
    objects: List[_PlacedObject]


def _sample_outline(
    rng: np.random.Generator, spec: _ObjectSpec, height: int, width: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Random centre and integer outline of an object."""
    center = rng.uniform([0.1 * width, 0.1 * height], [0.9 * width, 0.9 * height])
    radius = rng.uniform(*spec.size_range) / 2
    max_rotation = UPRIGHT_MAX_ROTATION if spec.upright else np.pi
    angle = rng.uniform(-max_rotation, max_rotation)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    )
    points = _UNIT_OUTLINES[spec.category] @ rotation.T * radius + center
    return center, np.round(points).astype(np.int32)


def _fill(outline: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [outline], 1)
    return mask.astype(bool)


def _visible_polygons(mask: np.ndarray) -> List[np.ndarray]:
    """Outer contours of a mask as (N, 2) arrays of pixel indices."""
    mode, method = cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    contours, _ = cv2.findContours(mask.astype(np.uint8), mode, method)
    return [contour.reshape(-1, 2) for contour in contours]


def _is_well_visible(obj: _PlacedObject, id_map: np.ndarray) -> bool:
    """
    Whether an object is visible enough to be annotated and its visible mask is exactly
    representable by COCO polygons: no holes, no tiny fragments, every contour >= 3 points.
    """
    visible = (id_map == obj.index).astype(np.uint8)
    area = int(visible.sum())
    if area < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * obj.drawn.sum()):
        return False
    contours, hierarchy = cv2.findContours(
        visible, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if (hierarchy[0][:, 3] != -1).any():  # a contour with a parent is a hole
        return False
    _, _, stats, _ = cv2.connectedComponentsWithStats(visible, connectivity=8)
    if (stats[1:, cv2.CC_STAT_AREA] < MIN_COMPONENT_PIXELS).any():
        return False
    return all(
        len(contour) >= 3 for contour in contours
    )  # all outer contours: no holes


def _layout(
    rng: np.random.Generator, specs: Sequence[_ObjectSpec], height: int, width: int
) -> Tuple[np.ndarray, List[_PlacedObject]]:
    """
    Place objects one by one in drawing order. A placement is retried (then given up) when it
    would leave an annotated object, itself included, too occluded or with an unrepresentable
    mask, so every drawn annotated object gets an annotation.
    """
    id_map = np.zeros((height, width), np.int32)
    objects: List[_PlacedObject] = []
    for spec in specs:
        for _ in range(MAX_PLACEMENT_TRIES):
            center, outline = _sample_outline(rng, spec, height, width)
            drawn = _fill(outline, height, width)
            if drawn.sum() < MIN_VISIBLE_PIXELS:
                continue
            candidate = _PlacedObject(spec, len(objects) + 1, center, outline, drawn)
            candidate_map = np.where(drawn, candidate.index, id_map)
            placed = objects + [candidate]
            if all(
                _is_well_visible(o, candidate_map) for o in placed if o.spec.annotated
            ):
                id_map, objects = candidate_map, placed
                break
    return id_map, objects


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A solid colour or a linear gradient between two colours, as float32 (H, W, 3)."""
    start = rng.uniform(0, 255, 3)
    end = rng.uniform(0, 255, 3) if rng.random() < 0.5 else start
    direction = rng.normal(size=2)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = xs * direction[0] + ys * direction[1]
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    return (start + ramp[..., None] * (end - start)).astype(np.float32)


def _contrasting_color(rng: np.random.Generator, reference: np.ndarray) -> np.ndarray:
    color = rng.uniform(0, 255, 3)
    while np.linalg.norm(color - reference) < 90:
        color = rng.uniform(0, 255, 3)
    return color


def _render(
    rng: np.random.Generator, specs: Sequence[_ObjectSpec], height: int, width: int
) -> _RenderedImage:
    id_map, objects = _layout(rng, specs, height, width)
    image = _background(rng, height, width)
    background_mean = image.reshape(-1, 3).mean(axis=0)
    for obj in objects:
        image[obj.drawn] = _contrasting_color(rng, background_mean)
    image += rng.normal(0, rng.uniform(2, 6), image.shape).astype(np.float32)
    return _RenderedImage(
        np.clip(np.round(image), 0, 255).astype(np.uint8), id_map, objects
    )


# ---------------------------------------------------------------- annotations


def _instance_annotation(obj: _PlacedObject, id_map: np.ndarray) -> dict:
    """bbox (XYWH), polygons and area of the visible part of an object."""
    visible = id_map == obj.index
    ys, xs = np.nonzero(visible)
    x0, y0 = int(xs.min()), int(ys.min())
    # Polygons go through the centres of the boundary pixels.
    polygons = [
        (polygon + 0.5).ravel().tolist() for polygon in _visible_polygons(visible)
    ]
    return {
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        "segmentation": polygons,
        "area": int(visible.sum()),
    }


def _keypoints(obj: _PlacedObject, id_map: np.ndarray) -> List[int]:
    """COCO keypoints of a star: v=2 visible, v=1 occluded, v=0 (at 0, 0) outside the image."""
    height, width = id_map.shape
    points = np.concatenate([obj.outline[0::2], np.round(obj.center)[None]]).astype(int)
    keypoints = []
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            keypoints += [0, 0, 0]
            continue
        # A tip is a single vertex: look at its 3x3 neighbourhood.
        neighbourhood = id_map[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
        keypoints += [int(x), int(y), 2 if (neighbourhood == obj.index).any() else 1]
    return keypoints


def _instance_specs(rng: np.random.Generator, image_index: int) -> List[_ObjectSpec]:
    count = rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1)
    return [_ObjectSpec(str(c)) for c in rng.choice(SHAPE_CATEGORIES, size=count)]


def _keypoint_specs(rng: np.random.Generator, image_index: int) -> List[_ObjectSpec]:
    stars = [
        _ObjectSpec(KEYPOINT_CATEGORY, upright=True, size_range=STAR_SIZE_RANGE)
        for _ in range(rng.integers(1, 4))
    ]
    clutter = [
        _ObjectSpec(str(c), annotated=False)
        for c in rng.choice(KEYPOINT_DISTRACTORS, size=rng.integers(1, 4))
    ]
    rest = stars[1:] + clutter
    # The first star is drawn first so that it can always be placed.
    return stars[:1] + [rest[i] for i in rng.permutation(len(rest))]


def _lvis_specs(rng: np.random.Generator, image_index: int) -> List[_ObjectSpec]:
    """Long-tailed categories; the first images of a split show every category once."""
    count = rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1)
    weights = np.array(LVIS_CATEGORY_WEIGHTS) / sum(LVIS_CATEGORY_WEIGHTS)
    categories = [str(c) for c in rng.choice(LVIS_CATEGORIES, size=count, p=weights)]
    if image_index < len(LVIS_CATEGORIES):
        categories[0] = LVIS_CATEGORIES[image_index]  # drawn first, hence always placed
    return [_ObjectSpec(c) for c in categories]


def _sem_seg_specs(rng: np.random.Generator, image_index: int) -> List[_ObjectSpec]:
    """3-6 larger shapes (so that a third of the pixels are objects, not background), then up to
    two unlabelled clutter crosses on top."""
    count = rng.integers(SEM_SEG_OBJECTS_PER_IMAGE[0], SEM_SEG_OBJECTS_PER_IMAGE[1] + 1)
    shapes = [
        _ObjectSpec(str(c), size_range=SEM_SEG_OBJECT_SIZE_RANGE)
        for c in rng.choice(SHAPE_CATEGORIES, size=count)
    ]
    clutter = rng.integers(
        SEM_SEG_CLUTTER_PER_IMAGE[0], SEM_SEG_CLUTTER_PER_IMAGE[1] + 1
    )
    return shapes + [
        _ObjectSpec(SEM_SEG_CLUTTER, annotated=False) for _ in range(clutter)
    ]


def _raw_sem_seg_label(rendered: _RenderedImage) -> np.ndarray:
    """ADE-style uint8 label: 1 + class index; 0 on clutter and on a band along every boundary
    between two regions (pixels whose 3x3 neighbourhood holds another region)."""
    label = np.full(
        rendered.id_map.shape, SEM_SEG_CLASSES.index("background") + 1, np.uint8
    )
    for obj in rendered.objects:
        value = (
            SEM_SEG_CLASSES.index(obj.spec.category) + 1 if obj.spec.annotated else 0
        )
        label[rendered.id_map == obj.index] = value
    ids = rendered.id_map.astype(np.float32)
    kernel = np.ones((3, 3), np.uint8)
    label[cv2.dilate(ids, kernel) != cv2.erode(ids, kernel)] = 0
    return label


# ---------------------------------------------------------------- dataset files


@dataclass(frozen=True)
class _Kind:
    name: str  # dataset folder and dataset-name prefix
    seed: int
    json_pattern: str  # relative to the dataset folder, formatted with the split
    categories: List[str]
    specs: Callable[[np.random.Generator, int], List[_ObjectSpec]]


_KINDS = {
    kind.name: kind
    for kind in [
        _Kind(
            "shapes",
            1,
            "annotations/instances_{}.json",
            SHAPE_CATEGORIES,
            _instance_specs,
        ),
        _Kind(
            "shapes_keypoints",
            2,
            "annotations/person_keypoints_{}.json",
            [KEYPOINT_CATEGORY],
            _keypoint_specs,
        ),
        _Kind(
            "shapes_lvis",
            3,
            "annotations/lvis_v1_{}.json",
            LVIS_CATEGORIES,
            _lvis_specs,
        ),
    ]
}
SPLITS = tuple(SPLIT_SIZES)
SHAPES_DATASET_NAMES = [f"{kind}_{split}" for kind in _KINDS for split in SPLITS]
_SEM_SEG_KIND = _Kind("shapes_sem_seg", 4, "", SEM_SEG_CLASSES, _sem_seg_specs)
SHAPES_SEM_SEG_DATASET_NAMES = [f"{_SEM_SEG_KIND.name}_{split}" for split in SPLITS]
_ALL_KINDS = {**_KINDS, _SEM_SEG_KIND.name: _SEM_SEG_KIND}
_ADE_SPLIT_DIRS = dict(
    zip(SPLITS, ADE20K_SPLITS)
)  # train -> training, val -> validation


def _render_split(
    kind: _Kind, split: str, image_dir: Path, file_pattern: str = "{:06d}.png"
):
    """Render and write the images of a split into ``image_dir``, named ``file_pattern`` of the
    1-based index; yield (rng, file_name, rendered) per image."""
    image_dir.mkdir(parents=True)
    for index in range(SPLIT_SIZES[split]):
        rng = np.random.default_rng([kind.seed, SPLITS.index(split), index])
        sides = rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1, size=2)
        height, width = int(sides[0]), int(sides[1])
        rendered = _render(rng, kind.specs(rng, index), height, width)
        file_name = file_pattern.format(index + 1)
        if not cv2.imwrite(str(image_dir / file_name), rendered.image):
            raise OSError(f"Could not write {image_dir / file_name}")
        yield rng, file_name, rendered


def _image_entry(image_id: int, file_name: str, rendered: _RenderedImage) -> dict:
    height, width = rendered.id_map.shape
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def _coco_categories(kind: _Kind) -> List[dict]:
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(kind.categories)
    ]
    if kind.name == "shapes_keypoints":
        tips = range(1, len(KEYPOINT_NAMES))
        categories[0]["keypoints"] = list(KEYPOINT_NAMES)
        categories[0]["skeleton"] = [[len(KEYPOINT_NAMES), tip] for tip in tips]
    return categories


def _coco_split(kind: _Kind, split: str, dataset_dir: Path) -> dict:
    """Write the images of a COCO-format split and return its JSON content."""
    images, annotations = [], []
    category_ids = {name: i + 1 for i, name in enumerate(kind.categories)}
    for _, file_name, rendered in _render_split(kind, split, dataset_dir / split):
        image_id = len(images) + 1
        images.append(_image_entry(image_id, file_name, rendered))
        for obj in rendered.objects:
            if not obj.spec.annotated:
                continue
            annotation = {"id": len(annotations) + 1, "image_id": image_id}
            annotation["category_id"] = category_ids[obj.spec.category]
            annotation.update(_instance_annotation(obj, rendered.id_map), iscrowd=0)
            if kind.name == "shapes_keypoints":
                keypoints = _keypoints(obj, rendered.id_map)
                annotation["keypoints"] = keypoints
                annotation["num_keypoints"] = sum(v > 0 for v in keypoints[2::3])
            annotations.append(annotation)
    return {
        "info": {
            "description": f"hybrid_d2 {kind.name} {split}",
            "version": FORMAT_VERSION,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _coco_categories(kind),
    }


def _lvis_split(kind: _Kind, split: str, dataset_dir: Path) -> dict:
    """Write the images of an LVIS-format split; return its JSON content without categories."""
    images, annotations = [], []
    for rng, file_name, rendered in _render_split(kind, split, dataset_dir / split):
        image_id = len(images) + 1
        present = set()
        for obj in rendered.objects:
            category_id = LVIS_CATEGORIES.index(obj.spec.category) + 1
            present.add(category_id)
            annotation = {"id": len(annotations) + 1, "image_id": image_id}
            annotation["category_id"] = category_id
            annotation.update(_instance_annotation(obj, rendered.id_map))
            annotations.append(annotation)
        absent = [i for i in range(1, len(LVIS_CATEGORIES) + 1) if i not in present]
        negatives = [i for i in absent if rng.random() < LVIS_NEGATIVE_PROBABILITY]
        image = _image_entry(image_id, file_name, rendered)
        image.update(
            coco_url=f"https://shapes.invalid/{split}/{file_name}",
            neg_category_ids=negatives,
            # Every object is annotated: no category is non-exhaustively labelled.
            not_exhaustive_category_ids=[],
        )
        images.append(image)
    return {"images": images, "annotations": annotations}


def _lvis_categories(train: dict) -> List[dict]:
    """LVIS categories with frequency groups from the training split counts."""
    num_images = len(train["images"])
    categories = []
    for category_id, name in enumerate(LVIS_CATEGORIES, start=1):
        annotations = [
            a for a in train["annotations"] if a["category_id"] == category_id
        ]
        image_count = len({a["image_id"] for a in annotations})
        if image_count <= LVIS_RARE_MAX_IMAGE_FRACTION * num_images:
            frequency = "r"
        elif image_count <= LVIS_COMMON_MAX_IMAGE_FRACTION * num_images:
            frequency = "c"
        else:
            frequency = "f"
        categories.append(
            {
                "id": category_id,
                "name": name,
                "synset": f"{name}.n.01",
                "synonyms": [name],
                "def": f"a {name} shape",
                "frequency": frequency,
                "image_count": image_count,
                "instance_count": len(annotations),
            }
        )
    if {c["frequency"] for c in categories} != {"r", "c", "f"}:
        raise RuntimeError(
            f"shapes_lvis frequency groups are not all populated: {categories}"
        )
    return categories


def _sem_seg_split(kind: _Kind, split: str, dataset_dir: Path) -> dict:
    """Write the images and raw labels of a split in the ADEChallengeData2016 layout; return the
    manifest entry: image count, each image's (height, width), unlabelled pixels."""
    ade_split = _ADE_SPLIT_DIRS[split]
    label_dir = dataset_dir / RAW_DIR / ade_split
    label_dir.mkdir(parents=True)
    pattern = f"SHAPES_{split}_{{:08d}}.jpg"  # as ADE_train_00000001.jpg
    sizes, unlabelled = {}, 0
    for _, file_name, rendered in _render_split(
        kind, split, dataset_dir / "images" / ade_split, pattern
    ):
        stem = os.path.splitext(file_name)[0]
        label = _raw_sem_seg_label(rendered)
        if not cv2.imwrite(str(label_dir / f"{stem}.png"), label):
            raise OSError(f"Could not write {label_dir / stem}.png")
        sizes[stem] = list(label.shape)
        unlabelled += int((label == 0).sum())
    return {"images": len(sizes), "sizes": sizes, "unlabelled_pixels": unlabelled}


def _write_json(content: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, separators=(",", ":"))


def _write_dataset(kind: _Kind, dataset_dir: Path) -> None:
    """Write all splits of a dataset, then its manifest."""
    if kind.name == _SEM_SEG_KIND.name:
        splits = {split: _sem_seg_split(kind, split, dataset_dir) for split in SPLITS}
        convert_ade20k_annotations(dataset_dir, num_classes=len(SEM_SEG_CLASSES))
        manifest = {
            "generator": __name__,
            "format_version": FORMAT_VERSION,
            "splits": splits,
        }
        _write_json(manifest, dataset_dir / MANIFEST_NAME)
        return
    if kind.name == "shapes_lvis":
        contents = {split: _lvis_split(kind, split, dataset_dir) for split in SPLITS}
        categories = _lvis_categories(contents["train"])
        for content in contents.values():
            content["categories"] = categories
    else:
        contents = {split: _coco_split(kind, split, dataset_dir) for split in SPLITS}
    manifest = {"generator": __name__, "format_version": FORMAT_VERSION, "splits": {}}
    for split, content in contents.items():
        _write_json(content, dataset_dir / kind.json_pattern.format(split))
        manifest["splits"][split] = {
            "images": len(content["images"]),
            "annotations": len(content["annotations"]),
        }
    if kind.name == "shapes_lvis":
        manifest["class_image_count"] = [
            {"id": c["id"], "image_count": c["image_count"]} for c in categories
        ]
    _write_json(manifest, dataset_dir / MANIFEST_NAME)


def _read_manifest(dataset_dir: Path) -> dict:
    with open(dataset_dir / MANIFEST_NAME) as f:
        return json.load(f)


def _validate(kind: _Kind, dataset_dir: Path) -> None:
    """Raise IncompleteDatasetError unless dataset_dir holds a complete generated dataset."""
    advice = "Move it away or delete it, and it will be generated again."
    if not (dataset_dir / MANIFEST_NAME).is_file():
        raise IncompleteDatasetError(
            f"{dataset_dir} exists but has no {MANIFEST_NAME}: it is incomplete or was not "
            f"generated by {__name__}. {advice}"
        )
    try:
        manifest = _read_manifest(dataset_dir)
    except ValueError as error:
        raise IncompleteDatasetError(
            f"{dataset_dir / MANIFEST_NAME} is invalid ({error}). {advice}"
        ) from error
    splits = manifest.get("splits", {})
    expected_counts = {split: splits.get(split, {}).get("images") for split in SPLITS}
    if (
        manifest.get("format_version") != FORMAT_VERSION
        or expected_counts != SPLIT_SIZES
    ):
        raise IncompleteDatasetError(
            f"{dataset_dir} was generated by another version of {__name__} "
            f"(format {manifest.get('format_version')}, images {expected_counts}). {advice}"
        )
    missing = (
        _missing_sem_seg_files(dataset_dir) if kind.name == _SEM_SEG_KIND.name else []
    )
    for split in SPLITS if kind.name != _SEM_SEG_KIND.name else ():
        json_file = dataset_dir / kind.json_pattern.format(split)
        if not json_file.is_file():
            missing.append(str(json_file))
        image_dir = dataset_dir / split
        num_images = len(list(image_dir.glob("*.png"))) if image_dir.is_dir() else 0
        if num_images != SPLIT_SIZES[split]:
            missing.append(
                f"{image_dir} ({num_images} of {SPLIT_SIZES[split]} PNG images)"
            )
    if missing:
        raise IncompleteDatasetError(
            f"{dataset_dir} is incomplete, missing: {', '.join(missing)}. {advice}"
        )


def _missing_sem_seg_files(dataset_dir: Path) -> List[str]:
    """The folders of a shapes_sem_seg dataset without their full count of files."""
    missing = []
    for split in SPLITS:
        ade_split = _ADE_SPLIT_DIRS[split]
        for folder, ext in (
            ("images", "jpg"),
            (RAW_DIR, "png"),
            (CONVERTED_DIR, "png"),
        ):
            path = dataset_dir / folder / ade_split
            count = len(list(path.glob(f"*.{ext}"))) if path.is_dir() else 0
            if count != SPLIT_SIZES[split]:
                missing.append(
                    f"{path} ({count} of {SPLIT_SIZES[split]} {ext.upper()} files)"
                )
    return missing


def _temp_prefix(kind: _Kind) -> str:
    return f".{kind.name}.tmp-{socket.gethostname()}-"


def _is_stale_temp_dir(path: Path, kind: _Kind) -> bool:
    """Whether a temporary folder was left by a dead process of this host."""
    if not path.name.startswith(_temp_prefix(kind)):
        return False
    pid = path.name[len(_temp_prefix(kind)) :].split("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        pass
    return False


def _generate(kind: _Kind, target: Path) -> None:
    """Generate a dataset in a temporary folder and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{kind.name}.tmp-*"):
        if _is_stale_temp_dir(leftover, kind):
            shutil.rmtree(leftover, ignore_errors=True)
    # Not tempfile.mkdtemp: its 0o700 mode would stay on the renamed, maybe shared, dataset.
    temp_dir = (
        target.parent / f"{_temp_prefix(kind)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    temp_dir.mkdir()
    try:
        _write_dataset(kind, temp_dir)
        os.rename(temp_dir, target)  # fails if another process installed it first
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _default_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


_registered_roots: Dict[str, str] = {}


def _kind_of(name_or_kind: str) -> _Kind:
    for kind in _ALL_KINDS.values():
        if name_or_kind == kind.name or name_or_kind in (
            f"{kind.name}_{s}" for s in SPLITS
        ):
            return kind
    known = SHAPES_DATASET_NAMES + SHAPES_SEM_SEG_DATASET_NAMES
    raise KeyError(f"{name_or_kind!r} is not a shapes dataset; known: {known}")


def is_shapes_dataset(name: str) -> bool:
    """Whether `name` is one of the generated shapes datasets (detection or semantic)."""
    return name in SHAPES_DATASET_NAMES or name in SHAPES_SEM_SEG_DATASET_NAMES


def ensure_shapes_dataset(
    name_or_kind: str, root: Optional[Union[str, os.PathLike]] = None
) -> Path:
    """
    Generate a shapes dataset unless it exists, and check that it is complete.

    Args:
        name_or_kind: a dataset name such as "shapes_lvis_val", or a kind such as "shapes_lvis".
        root: datasets root; defaults to the root it was registered with, else
            $DETECTRON2_DATASETS (default "datasets").

    Returns:
        the dataset folder (holding both splits).
    """
    kind = _kind_of(name_or_kind)
    if root is None:
        root = _registered_roots.get(kind.name, _default_root())
    target = Path(root) / kind.name
    if not target.exists():
        _generate(kind, target)
    _validate(kind, target)
    return target


# ---------------------------------------------------------------- registration


def _metadata(kind: _Kind) -> dict:
    metadata = {
        "thing_classes": list(kind.categories),
        "thing_colors": [CATEGORY_COLORS[c] for c in kind.categories],
    }
    if kind.name != "shapes_lvis":  # load_coco_json sets the same mapping when loading
        id_map = {i + 1: i for i in range(len(kind.categories))}
        metadata["thing_dataset_id_to_contiguous_id"] = id_map
    if kind.name == "shapes_keypoints":
        metadata.update(
            keypoint_names=KEYPOINT_NAMES,
            keypoint_flip_map=KEYPOINT_FLIP_MAP,
            keypoint_connection_rules=KEYPOINT_CONNECTION_RULES,
            keypoint_oks_sigmas=list(KEYPOINT_OKS_SIGMAS),
        )
    return metadata


def _lazy_loader(
    kind: _Kind, root: str, load: Callable[[], List[dict]]
) -> Callable[[], List[dict]]:
    def ensure_and_load() -> List[dict]:
        dataset_dir = ensure_shapes_dataset(kind.name, root)
        if kind.name == "shapes_lvis":
            counts = _read_manifest(dataset_dir)["class_image_count"]
            for split in SPLITS:
                MetadataCatalog.get(f"{kind.name}_{split}").set(
                    class_image_count=counts
                )
        return load()

    return ensure_and_load


def _load_sem_seg_records(dataset_dir: Path, split: str) -> List[dict]:
    """Detectron2's ``load_sem_seg`` records, with each image's height and width from the
    manifest (no image is read)."""
    ade_split = _ADE_SPLIT_DIRS[split]
    records = load_sem_seg(
        str(dataset_dir / CONVERTED_DIR / ade_split),
        str(dataset_dir / "images" / ade_split),
        gt_ext="png",
        image_ext="jpg",
    )
    sizes = _read_manifest(dataset_dir)["splits"][split]["sizes"]
    for record in records:
        record["height"], record["width"] = sizes[Path(record["file_name"]).stem]
    return records


def _register_sem_seg(split: str, root: str) -> None:
    """shapes_sem_seg_<split>, with the metadata of Detectron2's ADE20K registration."""
    name = f"{_SEM_SEG_KIND.name}_{split}"
    dataset_dir = Path(root) / _SEM_SEG_KIND.name

    def ensure_and_load() -> List[dict]:
        return _load_sem_seg_records(
            ensure_shapes_dataset(_SEM_SEG_KIND.name, root), split
        )

    DatasetCatalog.register(name, ensure_and_load)
    MetadataCatalog.get(name).set(
        stuff_classes=list(SEM_SEG_CLASSES),
        stuff_colors=[list(c) for c in SEM_SEG_COLORS],
        image_root=str(dataset_dir / "images" / _ADE_SPLIT_DIRS[split]),
        sem_seg_root=str(dataset_dir / CONVERTED_DIR / _ADE_SPLIT_DIRS[split]),
        evaluator_type="sem_seg",
        ignore_label=SEM_SEG_IGNORE_VALUE,
    )


def _register(kind: _Kind, split: str, root: str) -> None:
    name = f"{kind.name}_{split}"
    if kind.name == _SEM_SEG_KIND.name:
        _register_sem_seg(split, root)
        return
    json_file = os.path.join(root, kind.name, kind.json_pattern.format(split))
    if kind.name == "shapes_lvis":
        # load_lvis_json appends the split folder of "coco_url" to image_root by concatenation.
        image_root = os.path.join(root, kind.name, "")
        register_lvis_instances(name, _metadata(kind), json_file, image_root)
        # Its own loader would look up builtin LVIS metadata by name: load without a name.
        load = functools.partial(load_lvis_json, json_file, image_root)
    else:
        image_root = os.path.join(root, kind.name, split)
        register_coco_instances(name, _metadata(kind), json_file, image_root)
        load = DatasetCatalog[name]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, _lazy_loader(kind, root, load))


def register_shapes_datasets(root: Optional[str] = None) -> None:
    """
    Register the eight shapes datasets ("shapes_train", "shapes_val", "shapes_keypoints_train",
    "shapes_keypoints_val", "shapes_lvis_train", "shapes_lvis_val", "shapes_sem_seg_train",
    "shapes_sem_seg_val") under `root` (default $DETECTRON2_DATASETS or "datasets"). Files are
    generated on first DatasetCatalog.get. Names already registered are left as they are.
    """
    root = root if root is not None else _default_root()
    registered = set(DatasetCatalog.list())
    for kind in _ALL_KINDS.values():
        for split in SPLITS:
            if f"{kind.name}_{split}" not in registered:
                _register(kind, split, root)
                _registered_roots[kind.name] = root
