"""Semantic segmentation data: the ADE20K label conversion, the generated shapes_sem_seg set,
the guards, the training and test mapper, the resumable loader and the evaluator."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image

from conftest import REPO_ROOT, load_config
from hybrid_d2.data import LabelError, SemSegDatasetMapper
from hybrid_d2.data.ade20k import convert_ade20k_annotations, reduce_zero_label
from hybrid_d2.data.guards import check_sem_seg_dataset_dicts
from hybrid_d2.data.resumable import ResumableTrainLoader, seeded_rngs
from hybrid_d2.data.sem_seg import RandomRatioResize, build_sem_seg_train_augmentations
from hybrid_d2.data.shapes import SEM_SEG_CLASSES
from hybrid_d2.evaluation import CheckedSemSegEvaluator, build_evaluator

UPERNET_SHAPES = REPO_ROOT / "configs/shapes/mixformer_b1_upernet_shapes.yaml"
ADE_UPERNET = REPO_ROOT / "configs/ade20k/mixformer_b1_upernet_160k.yaml"


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _tiny_ade(root: Path, values=(0, 1, 75, 150)) -> Path:
    """An ADEChallengeData2016-layout folder with one 2x2 raw label per split."""
    for split in ("training", "validation"):
        _png(root / "annotations" / split / f"ADE_{split}_1.png", np.array(values, np.uint8).reshape(2, 2))
    return root


# --- ADE20K conversion --------------------------------------------------------------------------


def test_reduce_zero_label_maps_unlabelled_to_255_and_shifts_classes():
    raw = np.arange(151, dtype=np.uint8)
    assert reduce_zero_label(raw).tolist() == [255] + list(range(150))


def test_conversion_writes_annotations_detectron2(tmp_path):
    root = _tiny_ade(tmp_path / "ADEChallengeData2016")
    assert convert_ade20k_annotations(root) == {"training": 1, "validation": 1}
    for split in ("training", "validation"):
        converted = np.asarray(Image.open(root / "annotations_detectron2" / split / f"ADE_{split}_1.png"))
        assert converted.tolist() == [[255, 0], [74, 149]]


def test_conversion_refuses_a_non_ade_label_and_leaves_no_partial_split(tmp_path):
    root = _tiny_ade(tmp_path / "ADEChallengeData2016", values=(0, 1, 151, 3))
    bad = root / "annotations" / "training" / "ADE_training_1.png"
    with pytest.raises(LabelError, match=rf"label file {bad}: raw values \[151\] above 150"):
        convert_ade20k_annotations(root)
    assert list((root / "annotations_detectron2").iterdir()) == []


def test_preparation_script_reports_errors_in_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare", REPO_ROOT / "datasets/prepare_ade20k_sem_seg.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    assert prepare.main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'missing' / 'annotations' / 'training'} does not exist")
    assert prepare.main([str(_tiny_ade(tmp_path / "ade"))]) == 0
    assert (tmp_path / "ade/annotations_detectron2/validation/ADE_validation_1.png").is_file()


# --- shapes_sem_seg -----------------------------------------------------------------------------


def test_shapes_sem_seg_is_in_the_ade_layout_with_unlabelled_pixels(shapes_sem_seg_datasets):
    folder = shapes_sem_seg_datasets / "shapes_sem_seg"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    for split, ade_split in (("train", "training"), ("val", "validation")):
        records = DatasetCatalog.get(f"shapes_sem_seg_{split}")
        assert len(records) == manifest["splits"][split]["images"] > 0
        values = set()
        for record in records[:12]:
            stem = Path(record["file_name"]).stem
            assert record["file_name"] == str(folder / "images" / ade_split / f"{stem}.jpg")
            raw = np.asarray(Image.open(folder / "annotations" / ade_split / f"{stem}.png"))
            converted = np.asarray(Image.open(record["sem_seg_file_name"]))
            assert np.array_equal(converted, reduce_zero_label(raw))  # the ADE conversion's output
            assert (record["height"], record["width"]) == converted.shape == Image.open(record["file_name"]).size[::-1]
            values |= set(np.unique(converted).tolist())
        assert values == set(range(len(SEM_SEG_CLASSES))) | {255}, split
        assert manifest["splits"][split]["unlabelled_pixels"] > 0
    metadata = MetadataCatalog.get("shapes_sem_seg_val")
    assert (metadata.evaluator_type, metadata.ignore_label, metadata.stuff_classes) == ("sem_seg", 255, SEM_SEG_CLASSES)


# --- guards -------------------------------------------------------------------------------------


def _records(tmp_path, label: np.ndarray, image_shape=None):
    image = np.full(image_shape or (*label.shape, 3), 128, np.uint8)
    return [{"file_name": str(_png(tmp_path / "a.jpg", image)), "sem_seg_file_name": str(_png(tmp_path / "a.png", label))}]


def test_guards_accept_records_without_sizes_and_refuse_missing_labels(tmp_path):
    records = _records(tmp_path, np.zeros((40, 40), np.uint8))
    check_sem_seg_dataset_dicts(records, ["d"], num_classes=6, ignore_value=255)
    records.append(dict(records[0], sem_seg_file_name=str(tmp_path / "gone.png")))
    with pytest.raises(FileNotFoundError, match=rf"1 of the 2 label files of dataset 'd' do not exist:\n  {tmp_path / 'gone.png'}"):
        check_sem_seg_dataset_dicts(records, ["d"], num_classes=6, ignore_value=255)


def test_guards_refuse_label_values_outside_the_classes(tmp_path):
    records = _records(tmp_path, np.array([[0, 7], [255, 9]], np.uint8).repeat(20, 0).repeat(20, 1))
    message = rf"dataset 'd': label file {tmp_path / 'a.png'}: values 7, 9 are neither a class id in \[0, 5\]"
    with pytest.raises(LabelError, match=message):
        check_sem_seg_dataset_dicts(records, ["d"], num_classes=6, ignore_value=255)


# --- mapper -------------------------------------------------------------------------------------


def test_random_ratio_resize_is_mmsegs_keep_ratio_rescale():
    resize = RandomRatioResize(160, 640, (1.0, 1.0))
    assert resize.get_transform(np.zeros((100, 300, 3), np.uint8)).new_h == 160  # short side bound
    transform = resize.get_transform(np.zeros((100, 1000, 3), np.uint8))  # long side bound
    assert (transform.new_h, transform.new_w) == (64, 640)
    ratios = [RandomRatioResize(512, 2048, (0.5, 2.0)).get_transform(np.zeros((512, 512, 3), np.uint8)).new_h for _ in range(200)]
    assert 256 <= min(ratios) < 300 and 980 < max(ratios) <= 1024


def test_training_pipeline_order_is_mmsegs():
    cfg = load_config(ADE_UPERNET)
    augs = build_sem_seg_train_augmentations(cfg)
    assert [type(a).__name__ for a in augs] == [
        "RandomRatioResize", "RandomCrop_CategoryAreaConstraint", "RandomFlip", "ColorAugSSDTransform"]
    crop = augs[1]
    assert (crop.single_category_max_area, crop.ignored_category, tuple(crop.crop_aug.crop_size)) == (0.75, 255, (512, 512))


def test_training_sample_is_padded_to_the_crop_with_ignored_labels(tmp_path):
    geometry = ["INPUT.MIN_SIZE_TRAIN", (160,), "INPUT.RESIZE_RATIO_RANGE", (0.5, 0.5), "INPUT.CROP.SIZE", (128, 128)]
    cfg = load_config(UPERNET_SHAPES, [*geometry, "INPUT.COLOR_AUG_SSD", False])
    label = np.array([[0, 1], [2, 255]], np.uint8).repeat(50, 0).repeat(50, 1)  # 100x100
    sample = SemSegDatasetMapper(cfg, is_train=True)(_records(tmp_path, label)[0])
    # 100x100 -> short side 160 * 0.5 = 80, then padded to the 128x128 crop
    assert tuple(sample["image"].shape) == (3, 128, 128) and tuple(sample["sem_seg"].shape) == (128, 128)
    assert (sample["sem_seg"][80:] == 255).all() and (sample["sem_seg"][:, 80:] == 255).all()
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).round().to(torch.uint8)
    assert (sample["image"][:, 100:, 100:] == mean[:, None, None]).all()
    assert set(sample["sem_seg"][:80, :80].unique().tolist()) == {0, 1, 2, 255}  # nearest: no new value
    assert (sample["height"], sample["width"]) == (100, 100)


@pytest.mark.parametrize("is_train", [True, False])
def test_mapper_names_a_label_of_another_size_and_a_missing_label(tmp_path, is_train):
    cfg = load_config(UPERNET_SHAPES)
    record = _records(tmp_path, np.zeros((40, 50), np.uint8), image_shape=(40, 60, 3))[0]
    mapper = SemSegDatasetMapper(cfg, is_train=is_train)
    with pytest.raises(LabelError, match=rf"label file {tmp_path / 'a.png'} is 40x50 \(HxW\) but its image is 40x60"):
        mapper(record)
    with pytest.raises(LabelError, match=rf"label file {tmp_path / 'gone.png'} does not exist"):
        mapper(dict(record, sem_seg_file_name=str(tmp_path / "gone.png")))


def test_training_mapper_names_label_values_outside_the_classes(tmp_path):
    record = _records(tmp_path, np.full((40, 40), 150, np.uint8))[0]
    with pytest.raises(LabelError, match=r"values 150 are neither a class id in \[0, 5\] .* nor the ignore value 255"):
        SemSegDatasetMapper(load_config(UPERNET_SHAPES), is_train=True)(record)


def test_test_mapper_resizes_to_the_test_size_and_keeps_the_original_size(tmp_path):
    record = _records(tmp_path, np.zeros((100, 150), np.uint8))[0]
    sample = SemSegDatasetMapper(load_config(UPERNET_SHAPES), is_train=False)(record)
    assert tuple(sample["image"].shape) == (3, 80, 120) and "sem_seg" not in sample  # short side 80
    assert (sample["height"], sample["width"]) == (100, 150)


# --- resumable loader ---------------------------------------------------------------------------


def test_resumable_loader_takes_records_without_sizes_unless_grouping(tmp_path):
    cfg = load_config(UPERNET_SHAPES)
    records = _records(tmp_path, np.ones((40, 40), np.uint8)) * 3
    loader = ResumableTrainLoader(records, SemSegDatasetMapper(cfg), batch_size=2, seed=1, aspect_ratio_grouping=False)
    batch = next(iter(loader))
    assert [tuple(s["sem_seg"].shape) for s in batch] == [(64, 64)] * 2
    with pytest.raises(ValueError, match=r"DATALOADER.ASPECT_RATIO_GROUPING needs 'height' and 'width' .* set DATALOADER.ASPECT_RATIO_GROUPING False"):
        ResumableTrainLoader(records, SemSegDatasetMapper(cfg), batch_size=2, seed=1, aspect_ratio_grouping=True)


# --- evaluator ----------------------------------------------------------------------------------


def _register_one_image(name, tmp_path, label):
    DatasetCatalog.register(name, lambda: _records(tmp_path, label))
    MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255, evaluator_type="sem_seg")


def _logits(prediction: np.ndarray) -> dict:
    return {"sem_seg": torch.nn.functional.one_hot(torch.as_tensor(prediction).long(), 2).permute(2, 0, 1).float()}


def test_evaluator_excludes_ignored_pixels(tmp_path):
    """gt [[0, 1], [255, 1]] vs prediction [[0, 0], [1, 1]]: the ignored pixel's prediction does
    not count; each class has IoU 1/2, pixel accuracy 2/3."""
    _register_one_image("tiny_sem_seg_eval", tmp_path, np.array([[0, 1], [255, 1]], np.uint8))
    cfg = load_config(UPERNET_SHAPES)
    evaluator = build_evaluator(cfg, "tiny_sem_seg_eval", str(tmp_path / "out"))
    assert isinstance(evaluator, CheckedSemSegEvaluator)
    evaluator.reset()
    evaluator.process([{"file_name": str(tmp_path / "a.jpg")}], [_logits(np.array([[0, 0], [1, 1]]))])
    results = evaluator.evaluate()["sem_seg"]
    assert results["mIoU"] == pytest.approx(50.0) and results["pACC"] == pytest.approx(200 / 3)


def test_evaluator_names_a_ground_truth_value_outside_the_classes(tmp_path):
    _register_one_image("tiny_sem_seg_bad", tmp_path, np.array([[0, 1], [7, 1]], np.uint8))
    evaluator = build_evaluator(load_config(UPERNET_SHAPES), "tiny_sem_seg_bad", str(tmp_path / "out"))
    evaluator.reset()
    with pytest.raises(LabelError, match=rf"label file {tmp_path / 'a.png'}: values 7 are neither"):
        evaluator.process([{"file_name": str(tmp_path / "a.jpg")}], [_logits(np.zeros((2, 2)))])
