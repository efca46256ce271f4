"""Shapes datasets, their registration, dataset-file guards and the dataset mapper."""

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import create_keypoint_hflip_indices, get_fed_loss_cls_weights
from lvis import LVIS, LVISEval, LVISResults
from pycocotools.coco import COCO

from hybrid_d2.data import (
    SHAPES_DATASET_NAMES,
    DatasetMapper,
    ImageReadError,
    IncompleteDatasetError,
    check_dataset_files,
    ensure_shapes_dataset,
    register_shapes_datasets,
)
from hybrid_d2.data import shapes

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ["shapes", "shapes_keypoints", "shapes_lvis"]


def _register_under(root) -> None:
    for name in SHAPES_DATASET_NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_shapes_datasets(str(root))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A datasets root holding all three generated datasets, registered under their names."""
    root = tmp_path_factory.mktemp("datasets")
    for kind in KINDS:
        ensure_shapes_dataset(kind, root)
    _register_under(root)
    yield root
    _register_under(shapes._default_root())


def _json(root, kind, split):
    return root / kind / shapes._KINDS[kind].json_pattern.format(split)


def _load_coco(path) -> COCO:
    with contextlib.redirect_stdout(None):
        return COCO(str(path))


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(shapes_root, tmp_path):
    for kind in KINDS:
        again = _files(ensure_shapes_dataset(kind, tmp_path))
        assert again == _files(shapes_root / kind), kind
        assert len(again) == sum(shapes.SPLIT_SIZES.values()) + 3  # images, 2 JSON, manifest


@pytest.mark.parametrize("split", ["train", "val"])
def test_instances_are_valid_coco(shapes_root, split):
    coco = _load_coco(_json(shapes_root, "shapes", split))
    names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    assert names == ["circle", "square", "triangle", "star", "hexagon"]
    assert len(coco.imgs) == shapes.SPLIT_SIZES[split]
    assert len(coco.anns) / len(coco.imgs) >= 2.5
    for image in coco.imgs.values():
        assert 128 <= image["height"] <= 192 and 128 <= image["width"] <= 192
        assert len(coco.imgToAnns[image["id"]]) >= 1
    coverage = []
    for ann in coco.anns.values():
        image = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
        assert ann["segmentation"]
        for polygon in ann["segmentation"]:
            points = np.array(polygon).reshape(-1, 2)
            assert len(points) >= 3
            assert (points >= [x, y]).all() and (points <= [x + w, y + h]).all()
        # The rasterised polygons lie inside the box and cover most of the visible area.
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
        coverage.append(mask.sum() / ann["area"])
    # Polygons through boundary-pixel centres lose up to half a pixel along the outline.
    assert min(coverage) > 0.5 and np.mean(coverage) > 0.85


def test_images_match_their_records(shapes_root):
    coco = _load_coco(_json(shapes_root, "shapes", "val"))
    for image in coco.imgs.values():
        pixels = cv2.imread(str(shapes_root / "shapes" / "val" / image["file_name"]))
        assert pixels.shape == (image["height"], image["width"], 3)
        assert pixels.std() > 5  # background and objects, not a blank image


def test_objects_are_occluded_but_mostly_visible():
    drawn, visible = [], []
    for index in range(30):
        rng = np.random.default_rng(index)
        rendered = shapes._render(rng, shapes._instance_specs(rng, index), 160, 160)
        for obj in rendered.objects:
            drawn.append(obj.drawn.sum())
            visible.append((rendered.id_map == obj.index).sum())
    drawn, visible = np.array(drawn), np.array(visible)
    assert (visible < drawn).sum() >= 5  # some objects are partly hidden by later ones
    assert (visible >= shapes.MIN_VISIBLE_FRACTION * drawn).all()
    assert drawn.min() >= 16 and drawn.max() >= 40 * 40  # small and large objects


def test_keypoints_are_valid_coco(shapes_root):
    coco = _load_coco(_json(shapes_root, "shapes_keypoints", "train"))
    (category,) = coco.loadCats(coco.getCatIds())
    names = category["keypoints"]
    assert category["name"] == "star" and tuple(names) == shapes.KEYPOINT_NAMES
    assert all(1 <= i <= len(names) for pair in category["skeleton"] for i in pair)
    visibility_counts = np.zeros(3, int)
    for ann in coco.anns.values():
        image = coco.imgs[ann["image_id"]]
        keypoints = np.array(ann["keypoints"]).reshape(-1, 3)
        assert keypoints.shape == (len(names), 3)
        assert set(keypoints[:, 2]) <= {0, 1, 2}
        assert ann["num_keypoints"] == (keypoints[:, 2] > 0).sum()
        assert (keypoints[keypoints[:, 2] == 0, :2] == 0).all()
        labelled = keypoints[keypoints[:, 2] > 0]
        assert (labelled[:, 0] < image["width"]).all() and (labelled[:, 1] < image["height"]).all()
        visibility_counts += np.bincount(keypoints[:, 2], minlength=3)
    assert (visibility_counts > 20).all(), visibility_counts  # outside, occluded and visible


def test_keypoint_metadata(shapes_root):
    metadata = MetadataCatalog.get("shapes_keypoints_train")
    names = metadata.keypoint_names
    assert {name for pair in metadata.keypoint_flip_map for name in pair} <= set(names)
    assert {name for a, b, _ in metadata.keypoint_connection_rules for name in (a, b)} <= set(names)
    assert len(metadata.keypoint_oks_sigmas) == len(names)
    assert all(isinstance(s, float) for s in metadata.keypoint_oks_sigmas)
    # upper_right <-> upper_left and lower_right <-> lower_left swap under a horizontal flip.
    assert create_keypoint_hflip_indices("shapes_keypoints_train") == [0, 4, 3, 2, 1, 5]


def test_lvis_is_valid_and_federated(shapes_root):
    train = LVIS(str(_json(shapes_root, "shapes_lvis", "train")))
    val = LVIS(str(_json(shapes_root, "shapes_lvis", "val")))
    categories = train.load_cats(None)
    assert len(categories) == 8 and val.load_cats(None) == categories
    assert {c["frequency"] for c in categories} == {"r", "c", "f"}
    for category in categories:
        anns = train.load_anns(train.get_ann_ids(cat_ids=[category["id"]]))
        assert category["instance_count"] == len(anns)
        assert category["image_count"] == len({a["image_id"] for a in anns})
        assert category["synset"] and category["name"]
    for lvis, split in [(train, "train"), (val, "val")]:
        for image in lvis.load_imgs(None):
            present = {a["category_id"] for a in lvis.img_ann_map[image["id"]]}
            assert not present & set(image["neg_category_ids"])
            assert set(image["not_exhaustive_category_ids"]) <= present
            assert image["coco_url"].split("/")[-2:] == [split, image["file_name"]]
            assert (shapes_root / "shapes_lvis" / split / image["file_name"]).is_file()


def test_lvis_eval_finds_all_frequency_groups(shapes_root):
    gt = LVIS(str(_json(shapes_root, "shapes_lvis", "val")))
    perfect = [dict(a, score=1.0) for a in gt.load_anns(None)]
    evaluation = LVISEval(gt, LVISResults(gt, perfect), "segm")
    evaluation.run()
    assert all(len(group) > 0 for group in evaluation.freq_groups)
    assert [evaluation.results[k] for k in ("AP", "APr", "APc", "APf")] == [1.0] * 4


@pytest.mark.parametrize("name", SHAPES_DATASET_NAMES)
def test_dataset_catalog_loads(shapes_root, name):
    dicts = DatasetCatalog.get(name)
    metadata = MetadataCatalog.get(name)
    kind = shapes._kind_of(name)
    assert len(dicts) == shapes.SPLIT_SIZES[name.rsplit("_", 1)[1]]
    assert metadata.thing_classes == kind.categories
    assert len(metadata.thing_colors) == len(set(map(tuple, metadata.thing_colors)))
    assert metadata.evaluator_type == ("lvis" if kind.name == "shapes_lvis" else "coco")
    assert Path(metadata.json_file).is_file()
    for record in dicts[:5]:
        assert Path(record["file_name"]).is_file()
        for ann in record["annotations"]:
            assert 0 <= ann["category_id"] < len(metadata.thing_classes)
            assert ("keypoints" in ann) == (kind.name == "shapes_keypoints")


def test_lvis_class_image_count_after_loading(shapes_root):
    DatasetCatalog.get("shapes_lvis_val")
    weights = get_fed_loss_cls_weights(["shapes_lvis_train", "shapes_lvis_val"])
    assert weights.shape == (8,) and (weights > 0).all()


def test_registration_is_lazy_and_idempotent(shapes_root, tmp_path):
    try:
        _register_under(tmp_path / "lazy")
        register_shapes_datasets(str(tmp_path / "other"))  # names taken: left as they are
        assert not (tmp_path / "lazy").exists() and not (tmp_path / "other").exists()
        assert MetadataCatalog.get("shapes_val").json_file.startswith(str(tmp_path / "lazy"))
    finally:
        _register_under(shapes_root)


def _copy_writer(source_root):
    """A stand-in for the slow writer: copies an already generated dataset."""
    return lambda kind, folder: shutil.copytree(source_root / kind.name, folder, dirs_exist_ok=True)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_interrupted_generation_leaves_no_dataset(shapes_root, tmp_path, monkeypatch):
    def interrupted_writer(kind, folder):
        _copy_writer(shapes_root)(kind, folder)
        (folder / shapes.MANIFEST_NAME).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_dataset", interrupted_writer)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_dataset("shapes", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_leftover_temp_folders_are_ignored(shapes_root, tmp_path, monkeypatch):
    host = socket.gethostname()
    dead = tmp_path / f".shapes.tmp-{host}-{_dead_pid()}-abc"
    other_host = tmp_path / f".shapes.tmp-{host}x-{os.getpid()}-abc"
    for leftover in (dead, other_host):
        (leftover / "train").mkdir(parents=True)
    monkeypatch.setattr(shapes, "_write_dataset", _copy_writer(shapes_root))
    dataset_dir = ensure_shapes_dataset("shapes_train", tmp_path)
    assert _files(dataset_dir) == _files(shapes_root / "shapes")
    assert not dead.exists() and other_host.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_host.name, "shapes"]


def test_dataset_finished_first_by_another_process_wins(shapes_root, tmp_path, monkeypatch):
    def racing_writer(kind, folder):
        shutil.copytree(shapes_root / kind.name, tmp_path / kind.name)  # the other process
        (folder / "partial").touch()

    monkeypatch.setattr(shapes, "_write_dataset", racing_writer)
    dataset_dir = ensure_shapes_dataset("shapes_lvis", tmp_path)
    assert _files(dataset_dir) == _files(shapes_root / "shapes_lvis")
    assert [p.name for p in tmp_path.iterdir()] == ["shapes_lvis"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "MANIFEST.json").unlink(), "has no MANIFEST.json"),
        (lambda d: (d / "annotations" / "instances_val.json").unlink(), "instances_val.json"),
        (lambda d: (d / "train" / "000007.png").unlink(), "239 of 240 PNG images"),
        (lambda d: shutil.rmtree(d / "val"), "0 of 48 PNG images"),
        (
            lambda d: (d / "MANIFEST.json").write_text(
                json.dumps({"format_version": 0, "splits": {}})
            ),
            "another version",
        ),
    ],
    ids=["no_manifest", "missing_json", "missing_image", "missing_split", "other_version"],
)
def test_incomplete_dataset_is_reported_not_overwritten(shapes_root, tmp_path, damage, message):
    dataset_dir = tmp_path / "shapes"
    shutil.copytree(shapes_root / "shapes", dataset_dir)
    damage(dataset_dir)
    before = _files(dataset_dir)
    with pytest.raises(IncompleteDatasetError, match=message) as error:
        ensure_shapes_dataset("shapes_val", tmp_path)
    assert str(dataset_dir) in str(error.value)
    assert _files(dataset_dir) == before


@contextlib.contextmanager
def _registered_as_coco(name, root):
    """Temporarily point a registered COCO dataset at `root` (restoring it afterwards)."""
    loader, metadata = DatasetCatalog[name], MetadataCatalog.get(name).as_dict()
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    register_coco_instances(
        name, {}, str(root / "coco/annotations/instances_val2017.json"), str(root / "coco/val2017")
    )
    try:
        yield
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**metadata)


def test_check_dataset_files_names_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with _registered_as_coco("coco_2017_val", tmp_path):
        with pytest.raises(FileNotFoundError) as error:
            check_dataset_files("coco_2017_val")
        (tmp_path / "coco/annotations").mkdir(parents=True)
        (tmp_path / "coco/annotations/instances_val2017.json").write_text("{}")
        with pytest.raises(FileNotFoundError, match="val2017") as only_images:
            check_dataset_files("coco_2017_val")
        (tmp_path / "coco/val2017").mkdir()
        check_dataset_files("coco_2017_val")
    message = str(error.value)
    assert "'coco_2017_val'" in message and "datasets/README.md" in message
    assert str(tmp_path / "coco/annotations/instances_val2017.json") in message
    assert f"DETECTRON2_DATASETS={tmp_path}" in message
    assert "instances_val2017.json" not in str(only_images.value)


def test_check_dataset_files_unknown_name_suggests_similar():
    with pytest.raises(KeyError, match="coco_2017_val"):
        check_dataset_files("coco_2017_vall")


def test_check_dataset_files_accepts_generated_shapes(shapes_root):
    for name in SHAPES_DATASET_NAMES:
        check_dataset_files(name)


def _mapper():
    return DatasetMapper(
        is_train=True, augmentations=[], image_format="BGR", use_instance_mask=True
    )


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda data: b"", "is empty"),
        (lambda data: bytes(range(256)) * 8, "corrupt or truncated"),
        (lambda data: data[: len(data) // 2], "corrupt or truncated"),
        (lambda data: data[:40], "corrupt or truncated"),
        (None, "does not exist"),
    ],
    ids=["zero_bytes", "garbage", "truncated", "truncated_header", "missing"],
)
def test_mapper_names_unreadable_image(shapes_root, tmp_path, corrupt, problem):
    (record,) = [d for d in DatasetCatalog.get("shapes_val") if d["image_id"] == 3]
    broken = tmp_path / "broken.png"
    if corrupt is not None:
        broken.write_bytes(corrupt(Path(record["file_name"]).read_bytes()))
    with pytest.raises(ImageReadError, match=problem) as error:
        _mapper()(dict(record, file_name=str(broken)))
    assert str(broken) in str(error.value) and "image_id=3" in str(error.value)
    assert isinstance(error.value.__cause__, OSError)


def test_mapper_maps_a_readable_image(shapes_root):
    record = DatasetCatalog.get("shapes_val")[0]
    mapped = _mapper()(record)
    assert tuple(mapped["image"].shape) == (3, record["height"], record["width"])
    assert len(mapped["instances"]) == len(record["annotations"])
    assert mapped["instances"].gt_masks.polygons


def _check_datasets_main():
    spec = importlib.util.spec_from_file_location(
        "check_datasets", REPO_ROOT / "datasets/check_datasets.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_check_datasets_exit_status(shapes_root, capsys):
    main = _check_datasets_main()
    assert main(["shapes_val", "shapes_keypoints_train"]) == 0
    assert main(["shapes_val", "no_such_dataset"]) == 1
    output = capsys.readouterr().out
    assert "OK       shapes_keypoints_train" in output and "UNKNOWN  no_such_dataset" in output


def test_check_datasets_script_reports_missing_files(shapes_root):
    script = REPO_ROOT / "datasets" / "check_datasets.py"
    env = dict(os.environ, DETECTRON2_DATASETS=str(shapes_root))
    command = [sys.executable, str(script), "shapes_val", "coco_2017_val"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=shapes_root)
    assert result.returncode == 1, result.stderr
    assert "OK       shapes_val" in result.stdout
    assert str(shapes_root / "coco/annotations/instances_val2017.json") in result.stdout
