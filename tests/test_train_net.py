"""train_net.py end to end on the shapes data: training, evaluation, multi-process, bad input."""
import json
import re
import shutil

import pytest

from conftest import SHAPES_CONFIG, run_script

# A tiny but complete run: one iteration, then COCOEvaluator over shapes_val at a small size.
TINY = [
    "SOLVER.IMS_PER_BATCH", 2,
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MIN_SIZE_TEST", 128,
    "DATALOADER.NUM_WORKERS", 0,
]


def _copypaste_metrics(log: str) -> dict:
    """The AP rows Detectron2 prints as 'copypaste' lines, by task."""
    metrics, task = {}, None
    for line in log.splitlines():
        if "copypaste: Task: " in line:
            task = line.split("copypaste: Task: ")[1].strip()
        elif "copypaste: " in line and task and not line.rstrip().endswith("APl"):
            metrics[task] = line.split("copypaste: ")[1].strip()
    return metrics


def _check(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def one_step_run(datasets_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_step")
    log = _check(run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, *TINY, "SOLVER.MAX_ITER", 1, "OUTPUT_DIR", out],
        datasets_root,
    ))
    return out, log


def test_one_training_step_then_coco_evaluation(one_step_run):
    out, log = one_step_run
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    metrics = _copypaste_metrics(log)
    assert set(metrics) == {"bbox", "segm"}, log[-3000:]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in r for r in records)
    assert any("bbox/AP" in r and "segm/AP" in r for r in records)


def test_eval_only_reproduces_the_final_evaluation(one_step_run, datasets_root, tmp_path):
    out, train_log = one_step_run
    log = _check(run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, "--eval-only", *TINY,
         "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", tmp_path],
        datasets_root,
    ))
    assert _copypaste_metrics(log) == _copypaste_metrics(train_log)


def test_two_cpu_processes_with_gloo(datasets_root, tmp_path):
    log = _check(run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, "--num-gpus", 2, *TINY,
         "SOLVER.MAX_ITER", 2, "DATASETS.TEST", "()", "OUTPUT_DIR", tmp_path],
        datasets_root,
    ))
    assert "World size: 2" in log
    assert (tmp_path / "model_final.pth").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["MODEL.MIXFORMER.VARIANT", "b9"], "unknown MixFormer variant 'b9'"),
        (["MODEL.MIXFORMER.VARAINT", "b1"], "unknown config key MODEL.MIXFORMER.VARAINT; did you mean MODEL.MIXFORMER.VARIANT"),
        (["DATASETS.TRAIN", "('coco_2017_train',)"], "instances_train2017.json"),
    ],
    ids=["unknown-variant", "unknown-config-key", "missing-dataset-files"],
)
def test_bad_input_is_named_in_the_error(datasets_root, tmp_path, overrides, message):
    result = run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, *TINY, "SOLVER.MAX_ITER", 1, "OUTPUT_DIR", tmp_path, *overrides],
        datasets_root,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "model_final.pth").exists()


def test_unknown_key_in_a_config_file_names_the_file(datasets_root, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f'_BASE_: "{SHAPES_CONFIG}"\nMODEL:\n  MIXFORMER:\n    DROP_PATH: 0.1\n')
    result = run_script("train_net.py", ["--config-file", config], datasets_root)
    assert result.returncode != 0
    assert re.search(rf"{re.escape(str(config))}: unknown config key MODEL.MIXFORMER.DROP_PATH", result.stderr)


def test_corrupt_image_in_a_dataset_is_named(datasets_root, tmp_path):
    root = tmp_path / "datasets"
    shutil.copytree(datasets_root / "shapes", root / "shapes")
    for image in (root / "shapes" / "train").glob("*.png"):
        image.write_bytes(b"not a png")
    result = run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, *TINY, "SOLVER.MAX_ITER", 1, "OUTPUT_DIR", tmp_path / "out"],
        root,
    )
    assert result.returncode != 0
    assert re.search(r"Image \S+/shapes/train/\S+\.png of dataset record image_id=\d+ cannot be decoded", result.stderr), result.stderr[-3000:]
