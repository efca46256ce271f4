"""Dataset-dict guards (hybrid_d2.data.guards.check_dataset_dicts, load_detection_dataset_dicts) on
tiny COCO jsons with one defect each, and what Detectron2 itself does with those defects."""

import copy
import json
import logging
import uuid
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode

from conftest import SHAPES_CONFIG, load_config
from hybrid_d2.data.guards import check_dataset_dicts, load_detection_dataset_dicts
from hybrid_d2.engine import Trainer

SIZE = 64
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]
GUARDS_LOGGER = "hybrid_d2.data.guards"


def annotation(ann_id: int, image_id: int, bbox, category_id: int = 1, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "bbox": list(bbox),
        "category_id": category_id,
        "iscrowd": iscrowd,
        "area": 16.0,
    }


def image(image_id: int, **overrides) -> dict:
    entry = {"id": image_id, "file_name": f"{image_id}.png", "height": SIZE, "width": SIZE}
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


CLEAN_ANNOTATIONS = [annotation(1, 1, [4, 4, 10, 12]), annotation(2, 2, [20, 30, 8, 8], 2)]


def _unregister(names):
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def coco(tmp_path):
    """make(images, annotations, write=...) -> the name of a registered COCO dataset in tmp_path;
    every name is removed from the catalogs afterwards."""
    names = []

    def make(images=None, annotations=CLEAN_ANNOTATIONS, categories=CATEGORIES, write=None):
        images = images if images is not None else [image(1), image(2)]
        name = f"guards_test_{uuid.uuid4().hex[:8]}"
        for entry in images:
            if write is None or entry["id"] in write:
                cv2.imwrite(str(tmp_path / entry["file_name"]), np.zeros((SIZE, SIZE, 3), np.uint8))
        json_file = tmp_path / f"{name}.json"
        payload = {"images": images, "annotations": annotations, "categories": categories}
        json_file.write_text(json.dumps(payload))  # NaN/Infinity as JS literals, as json reads them
        register_coco_instances(name, {}, str(json_file), str(tmp_path))
        names.append(name)
        return name

    yield make
    _unregister(names)


@pytest.fixture
def custom(tmp_path):
    """make(records) -> the name of a dataset registered with a plain loader (no metadata)."""
    names = []

    def make(records):
        name = f"guards_test_{uuid.uuid4().hex[:8]}"
        DatasetCatalog.register(name, lambda: copy.deepcopy(records))
        names.append(name)
        return name

    yield make
    _unregister(names)


def warnings_from_guards(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == GUARDS_LOGGER and r.levelno >= logging.WARNING
    ]


@contextmanager
def capture_detectron2_build_log(caplog):
    """Capture detectron2.data.build's INFO records even when Detectron2's setup_logger turned off
    propagation of the "detectron2" logger earlier in the session."""
    logger = logging.getLogger("detectron2.data.build")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            yield
    finally:
        logger.removeHandler(caplog.handler)


def test_clean_dataset_passes_silently(coco, caplog):
    name = coco()
    dicts = get_detection_dataset_dicts([name])
    with caplog.at_level(logging.DEBUG, logger=GUARDS_LOGGER):
        check_dataset_dicts(dicts, [name], num_classes=2)
    assert not [r for r in caplog.records if r.name == GUARDS_LOGGER]


def test_missing_images_are_refused_with_count_and_first_paths(coco, tmp_path):
    name = coco(
        images=[image(i) for i in range(1, 14)],
        write={1},
        annotations=[annotation(i, i, [4, 4, 10, 10]) for i in range(1, 14)],
    )
    dicts = get_detection_dataset_dicts([name])
    with pytest.raises(FileNotFoundError) as info:
        check_dataset_dicts(dicts, [name], num_classes=2)
    message = str(info.value)
    assert f"12 of the 13 images of dataset '{name}'" in message
    listed = [line.strip() for line in message.splitlines() if line.strip().endswith(".png")]
    assert listed == [str(tmp_path / f"{i}.png") for i in range(2, 12)]  # the first 10
    assert "..." in message


def test_category_ids_beyond_num_classes_are_refused(coco):
    """Detectron2 maps the json's ids to [0, #categories) and checks them against the metadata's
    thing_classes only, not against the model's NUM_CLASSES."""
    categories = CATEGORIES + [{"id": 3, "name": "star"}]
    name = coco(
        annotations=CLEAN_ANNOTATIONS + [annotation(3, 2, [1, 1, 5, 5], 3)], categories=categories
    )
    dicts = get_detection_dataset_dicts([name])  # passes in Detectron2
    with pytest.raises(ValueError) as info:
        check_dataset_dicts(dicts, [name], num_classes=2)
    message = str(info.value)
    for part in (
        f"dataset '{name}'",
        "outside [0, 2)",
        ": 2;",
        "2.png",
        "3 thing_classes",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "MODEL.RETINANET.NUM_CLASSES",
    ):
        assert part in message


def test_raw_lvis_style_ids_are_refused(custom, tmp_path):
    """A loader that keeps raw (1-based, sparse) ids and sets no thing_classes passes Detectron2."""
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((SIZE, SIZE, 3), np.uint8))
    record = {
        "file_name": str(tmp_path / "a.png"),
        "image_id": 1,
        "height": SIZE,
        "width": SIZE,
        "annotations": [{"bbox": [1, 1, 9, 9], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1203}],
    }
    name = custom([record])
    dicts = get_detection_dataset_dicts([name])
    with pytest.raises(ValueError, match=r"outside \[0, 80\).*: 1203;.*a\.png"):
        check_dataset_dicts(dicts, [name], num_classes=80)


def test_json_category_not_in_categories_names_the_json(coco, tmp_path):
    name = coco(annotations=CLEAN_ANNOTATIONS + [annotation(3, 1, [1, 1, 5, 5], 9)])
    json_file = str(tmp_path / f"{name}.json")
    # Detectron2's load_coco_json: a KeyError that names neither the json nor the dataset
    with pytest.raises(KeyError, match="category_id=9 but this id does not exist") as info:
        get_detection_dataset_dicts([name])
    assert json_file not in str(info.value) and name not in str(info.value)
    with pytest.raises(ValueError, match=f"dataset '{name}' from {json_file}: .*category_id=9"):
        load_detection_dataset_dicts([name])


def test_json_image_without_height_names_the_json(coco, tmp_path):
    name = coco(images=[image(1, height=None), image(2)])
    with pytest.raises(KeyError, match="^'height'$"):  # Detectron2: the bare key
        get_detection_dataset_dicts([name])
    with pytest.raises(ValueError, match=rf"{name}\.json: .*no key 'height'"):
        load_detection_dataset_dicts([name])


@pytest.mark.parametrize("missing", ["height", "width"])
def test_records_without_image_size_are_refused(custom, tmp_path, missing):
    record = {
        "file_name": str(tmp_path / "a.png"),
        "image_id": 1,
        "height": SIZE,
        "width": SIZE,
        "annotations": [{"bbox": [1, 1, 9, 9], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}],
    }
    cv2.imwrite(record["file_name"], np.zeros((SIZE, SIZE, 3), np.uint8))
    del record[missing]
    name = custom([record])
    with pytest.raises(ValueError, match=rf"a\.png of dataset '{name}'.*'{missing}': None"):
        check_dataset_dicts(get_detection_dataset_dicts([name]), [name], num_classes=1)


def test_boxes_detectron2_clips_drops_or_reorders_are_logged(coco, caplog):
    boxes = [
        [4, 4, 10, 12],  # fine
        [50, 50, 30, 30],  # extends outside: clipped
        [-5, 10, 10, 10],  # extends outside: clipped
        [10, 10, 0, 5],  # zero width: dropped
        [70, 10, 5, 5],  # entirely outside: clipped to zero area, dropped
        [20, 20, -6, 5],  # negative width: corners swapped, kept
    ]
    name = coco(annotations=[annotation(i, 1, box) for i, box in enumerate(boxes, 1)])
    dicts = get_detection_dataset_dicts([name])
    with caplog.at_level(logging.WARNING, logger=GUARDS_LOGGER):
        check_dataset_dicts(dicts, [name], num_classes=2)
    assert warnings_from_guards(caplog) == [
        f"dataset '{name}' ({MetadataCatalog.get(name).json_file}): 2 boxes extend outside their "
        "image and will be clipped; 2 boxes have zero area (after clipping) and will be dropped; "
        "1 boxes have negative width or height and will be kept with their corners swapped, as "
        "Detectron2 does."
    ]
    # what Detectron2's training mapper does with them
    mapper = DatasetMapper(
        is_train=True, augmentations=[T.ResizeShortestEdge(SIZE, SIZE)], image_format="BGR"
    )
    record = next(d for d in dicts if d["image_id"] == 1)
    gt_boxes = mapper(copy.deepcopy(record))["instances"].gt_boxes.tensor.tolist()
    assert gt_boxes == [[4, 4, 14, 16], [50, 50, 64, 64], [0, 10, 5, 20], [14, 20, 20, 25]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_boxes_are_refused(coco, bad):
    box = [4, 4, bad, 10]
    name = coco(annotations=CLEAN_ANNOTATIONS + [annotation(3, 2, box)])
    dicts = get_detection_dataset_dicts([name])
    with pytest.raises(
        ValueError,
        match=rf"non-finite coordinates, e\.g\. \[4, 4, {bad}, 10\] "
        r"\(XYWH_ABS\) in image .*2\.png",
    ):
        check_dataset_dicts(dicts, [name], num_classes=2)


def test_images_without_annotations(coco, caplog):
    name = coco(annotations=[annotation(1, 1, [4, 4, 10, 12])])  # image 2 has none
    with capture_detectron2_build_log(caplog):
        dicts = get_detection_dataset_dicts([name], filter_empty=True)
    assert "Removed 1 images with no usable annotations. 1 images left." in caplog.messages
    check_dataset_dicts(dicts, [name], num_classes=2)  # Detectron2 already filtered it


def test_datasets_left_without_images_are_refused(coco):
    crowd_only = [annotation(1, 1, [4, 4, 10, 12], iscrowd=1)]
    name = coco(annotations=crowd_only)
    # Detectron2: a bare AssertionError after filtering
    with pytest.raises(AssertionError, match=f"No valid data found in {name}"):
        get_detection_dataset_dicts([name], filter_empty=True)
    message = f"No training images left in dataset '{name}' .*FILTER_EMPTY_ANNOTATIONS"
    with pytest.raises(ValueError, match=message):
        load_detection_dataset_dicts([name], filter_empty=True)
    with pytest.raises(ValueError, match=message):
        check_dataset_dicts([], [name], num_classes=2)
    unfiltered = get_detection_dataset_dicts([name], filter_empty=False)
    with pytest.raises(ValueError, match="None of the 2 images .* has a non-crowd annotation"):
        check_dataset_dicts(unfiltered, [name], num_classes=2)


@pytest.mark.parametrize("sampler", ["TrainingSampler", "RandomSubsetTrainingSampler"])
def test_both_training_loaders_read_checked_records(coco, sampler):
    """The Trainer's resumable loader and Detectron2's loader (for a sampler that cannot seek)
    refuse the same bad record before training."""
    categories = CATEGORIES + [{"id": 3, "name": "star"}]
    annotations = CLEAN_ANNOTATIONS + [annotation(3, 2, [1, 1, 5, 5], 3)]
    name = coco(annotations=annotations, categories=categories)
    cfg = load_config(
        SHAPES_CONFIG,
        ["DATASETS.TRAIN", (name,), "MODEL.ROI_HEADS.NUM_CLASSES", 2,
         "DATALOADER.SAMPLER_TRAIN", sampler, "DATALOADER.NUM_WORKERS", 0],
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"dataset '{name}'.* outside \[0, 2\)"):
        Trainer.build_train_loader(cfg)
