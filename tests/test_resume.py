"""Exact resume: the seekable training stream continues any iteration's batches, and a training
run SIGKILLed several times (in the middle of checkpoint saves too) and resumed with --resume ends
with the losses and weights of an uninterrupted run."""
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.samplers import RepeatFactorTrainingSampler

from conftest import REPO_ROOT, SHAPES_CONFIG, load_config
from hybrid_d2.data.resumable import ResumableTrainLoader, _EpochOrder
from hybrid_d2.engine import Trainer
from hybrid_d2.engine.launch import LOCK_FILE_NAME

MAX_ITER = 10
TINY = [
    "SOLVER.IMS_PER_BATCH", 2,
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", 160,
    "DATALOADER.NUM_WORKERS", 2,
    "SOLVER.CHECKPOINT_PERIOD", 2,  # checkpoints after iterations 1, 3, 5, 7, 9 (+ model_final)
    "SOLVER.WRITER_PERIOD", 1,  # every iteration's raw losses in metrics.json
    "TEST.EVAL_PERIOD", 0,
    "DATASETS.TEST", "()",
    "SOLVER.MAX_ITER", MAX_ITER,
    "SEED", 7,
]
TIMEOUT = 180  # seconds, per launch
LOSS_KEYS = re.compile(r"^(total_loss|loss_\w+|lr)$")


def _launch(
    out: Path,
    log: Path,
    datasets_root: Path,
    resume: bool,
    config: Path = SHAPES_CONFIG,
    processes: int = 1,
    overrides: Sequence = TINY,
) -> subprocess.Popen:
    """train_net.py in its own process group (so that a kill takes its data workers along)."""
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(datasets_root),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # one thread: reductions in a fixed order
        MKL_NUM_THREADS="1",
    )
    args = ["--num-gpus", processes, "--config-file", config, *(["--resume"] if resume else [])]
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "train_net.py"), *map(str, args),
             *map(str, overrides), "OUTPUT_DIR", str(out)],
            cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _wait_for(proc: subprocess.Popen, log: Path, pattern: str) -> Optional[re.Match]:
    """The first match of ``pattern`` in the log, or None if the process ended without one."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text())
        if match or proc.poll() is not None:
            return match or re.search(pattern, log.read_text())
        time.sleep(0.005)
    _kill(proc)
    pytest.fail(f"no {pattern!r} within {TIMEOUT} s:\n{log.read_text()[-3000:]}")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _temp_checkpoints(out: Path) -> List[str]:
    """The temporary files of checkpoint saves (hidden files other than the run's lock)."""
    return sorted(
        p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE_NAME
    )


def _kill_during_save(proc: subprocess.Popen, out: Path, log: Path, name: str) -> bool:
    """Kill the run while ``name`` is half written: once its save starts, freeze the process
    group in short steps until the temporary file is seen, then SIGKILL it. False if missed."""
    if not _wait_for(proc, log, rf"Saving checkpoint to \S*/{re.escape(name)}"):
        return False
    while proc.poll() is None:
        os.killpg(proc.pid, signal.SIGSTOP)
        if any(n.startswith(f".{name}.") for n in _temp_checkpoints(out)):
            _kill(proc)
            return True
        if (out / name).exists():  # renamed already: missed the save, kill right after it
            _kill(proc)
            return False
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    return False


def _kill_after(proc: subprocess.Popen, log: Path, pattern: str, delay: float) -> None:
    if _wait_for(proc, log, pattern):
        time.sleep(delay)
        if proc.poll() is None:
            _kill(proc)


def _iteration(path: Path) -> int:
    """The iteration of a complete checkpoint; loading it (weights only) proves it is complete."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iteration"]


def _expected_start(out: Path) -> int:
    """Check the checkpoints a kill left: every model_*.pth loads, last_checkpoint names the
    newest; return the iteration a resume must start from."""
    if not (out / "last_checkpoint").exists():
        assert not list(out.glob("model_*.pth"))
        return 0
    iterations = {p.name: _iteration(p) for p in out.glob("model_*.pth")}
    last = (out / "last_checkpoint").read_text().strip()
    assert last in iterations, (last, iterations)
    newest = max(iterations.values())
    assert iterations[last] == newest, (last, iterations)
    return newest + 1


def _losses(out: Path) -> Dict[int, Dict[str, float]]:
    """Losses and lr of each iteration in metrics.json; a resumed run's record wins."""
    losses = {}
    for line in (out / "metrics.json").read_text().splitlines():
        record = json.loads(line)
        if "total_loss" in record:
            losses[record["iteration"]] = {k: v for k, v in record.items() if LOSS_KEYS.match(k)}
    return losses


@pytest.fixture(scope="module")
def reference(datasets_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    proc = _launch(out, out / "stdout.log", datasets_root, resume=False)
    assert proc.wait(timeout=TIMEOUT) == 0, (out / "stdout.log").read_text()[-5000:]
    return out


def test_killed_and_resumed_run_equals_uninterrupted_run(reference, datasets_root, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    rng = random.Random()
    delays = [round(rng.uniform(0.0, 0.6), 3), round(rng.uniform(0.0, 1.0), 3)]
    kills = [
        lambda p, log: _kill_during_save(p, out, log, "model_0000003.pth"),
        lambda p, log: _kill_after(p, log, r"\biter: 5\b", delays[0]),
        lambda p, log: _kill_after(p, log, r"Starting training from iteration", delays[1]),
        lambda p, log: _kill_during_save(p, out, log, "model_final.pth"),
    ]
    context = f"kill delays {delays}"
    save_kills, starts = 0, []
    for launch, kill in enumerate(kills + [None]):
        left = _temp_checkpoints(out)
        start = _expected_start(out)
        log = tmp_path / f"launch{launch}.log"
        proc = _launch(out, log, datasets_root, resume=launch > 0)
        try:
            match = _wait_for(proc, log, r"Starting training from iteration (\d+)")
            assert match is not None, context + log.read_text()[-5000:]
            starts.append(int(match[1]))
            assert starts[-1] == start, (context, launch, starts)
            assert not set(left) & set(_temp_checkpoints(out)), (left, _temp_checkpoints(out))
            for name in left:
                assert f"Removed {out / name}" in log.read_text()
            if kill is None:
                assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-5000:]
            elif kill(proc, log) is True:
                save_kills += 1
                assert _temp_checkpoints(out), "a kill during a save leaves its temporary file"
        finally:
            if proc.poll() is None:
                _kill(proc)
    assert save_kills >= 1, f"no kill landed during a checkpoint save ({context})"
    assert starts[-1] == MAX_ITER  # killed while saving model_final: resumed after the last step
    assert not _temp_checkpoints(out)
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"

    _check_same_run(out, reference, MAX_ITER, f"{context}, starts {starts}")


def _check_same_run(out: Path, reference: Path, max_iter: int, context: str, first: int = 0) -> None:
    """The losses and lr of iterations ``first`` ... ``max_iter - 1`` within 1e-6 and bitwise
    equal final weights."""
    expected, got = _losses(reference), _losses(out)
    assert sorted(got) == list(range(first, max_iter)), (sorted(got), context)
    assert sorted(expected) == list(range(max_iter))
    for iteration in got:
        assert got[iteration].keys() == expected[iteration].keys()
        for key, value in expected[iteration].items():
            assert got[iteration][key] == pytest.approx(value, abs=1e-6, rel=0), (
                f"iteration {iteration} {key}: {got[iteration][key]} != {value} ({context})"
            )
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    final_reference = torch.load(reference / "model_final.pth", weights_only=True)["model"]
    assert final.keys() == final_reference.keys()
    different = [k for k in final if not torch.equal(final[k], final_reference[k])]
    assert not different, different[:10]


# One short run per framework: 4 iterations, checkpoints after iterations 1 and 3 (final).
FRAMEWORK_CONFIGS = {
    "retinanet": "mixformer_b1_retinanet_shapes.yaml",
    "mask_rcnn": "mixformer_b1_mask_rcnn_shapes.yaml",
    "cascade": "mixformer_b1_cascade_mask_rcnn_shapes.yaml",
    "keypoint": "mixformer_b1_keypoint_rcnn_shapes.yaml",
    "lvis": "mixformer_b1_lvis_mask_rcnn_shapes.yaml",  # RepeatFactorTrainingSampler
}
SHORT_MAX_ITER = 4
SHORT = [
    "SOLVER.IMS_PER_BATCH", 2,  # 1 image per process with 2 processes
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", 160,
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.CHECKPOINT_PERIOD", 2,
    "SOLVER.WRITER_PERIOD", 1,
    "TEST.EVAL_PERIOD", 0,
    "DATASETS.TEST", "()",
    "SOLVER.MAX_ITER", SHORT_MAX_ITER,
    "SEED", 7,
]


# Every other family's quick config, in one process.
FAMILY_CONFIGS = {
    "dualformer": "dualformer_t_mask_rcnn_shapes.yaml",
    "dmf": "dmf_s_retinanet_shapes.yaml",
    "dmformer": "dmformer_s_mask_rcnn_shapes.yaml",
}
# Two processes where a framework keeps per-rank state of its own (RetinaNet's loss normalizer,
# the LVIS repeat-factor sampler), one process for the others: the one-process path itself is
# that of every other case, and one-process Mask R-CNN is
# test_killed_and_resumed_run_equals_uninterrupted_run's run.
PER_RANK_STATE = {"lvis", "retinanet"}
RESUME_CASES = [
    (name, 2 if name in PER_RANK_STATE else 1)
    for name in sorted({*FRAMEWORK_CONFIGS, *FAMILY_CONFIGS} - {"mask_rcnn"})
]
# The 2-process RetinaNet run (per-rank state) is SIGKILLed (the whole process group) after
# iteration 2 and resumed; the other cases resume from checkpoint 1 of the uninterrupted run, the
# file such a kill leaves (kills in one process: test_killed_and_resumed_run_equals_uninterrupted_run).
KILLED_CASES = {("retinanet", 2)}


def _killed_after_iteration_2(launch, out: Path, log: Path) -> None:
    proc = launch(out, log, resume=False)
    assert _wait_for(proc, log, r"\biter: 2\b"), "run ended before iteration 2"
    if proc.poll() is None:
        _kill(proc)


def _left_at_checkpoint_1(reference: Path, out: Path) -> None:
    """What a run killed between checkpoints 1 and 3 leaves: checkpoint 1, named as the last."""
    out.mkdir()
    shutil.copy(reference / "model_0000001.pth", out)
    (out / "last_checkpoint").write_text("model_0000001.pth")


@pytest.mark.parametrize("name, processes", RESUME_CASES)
def test_every_framework_resumes_exactly(name, processes, shapes_datasets, tmp_path):
    """Resumed from checkpoint 1 (after iteration 1) of a 4-iteration run, iterations 2-3 repeat
    the uninterrupted run's, with every process's running statistics (RetinaNet's loss
    normalizer) restored, and the final weights are bitwise equal."""
    config = REPO_ROOT / "configs/shapes" / {**FRAMEWORK_CONFIGS, **FAMILY_CONFIGS}[name]
    launch = functools.partial(
        _launch, datasets_root=shapes_datasets, config=config, processes=processes,
        overrides=SHORT,
    )
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    proc = launch(reference, tmp_path / "reference.log", resume=False)
    assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "reference.log").read_text()[-5000:]
    killed = (name, processes) in KILLED_CASES
    if killed:
        _killed_after_iteration_2(launch, out, tmp_path / "killed.log")
        assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    else:
        _left_at_checkpoint_1(reference, out)
    proc = launch(out, tmp_path / "resumed.log", resume=True)
    assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "resumed.log").read_text()[-5000:]
    assert "Starting training from iteration 2" in (tmp_path / "resumed.log").read_text()
    context = f"{name}, {processes} processes"
    _check_same_run(out, reference, SHORT_MAX_ITER, context, first=0 if killed else 2)


# --- the seekable stream, in-process ---------------------------------------------------------


def _draw_mapper(record: dict) -> dict:
    """A cheap stand-in for the DatasetMapper: the record's id and one draw from each RNG."""
    sample = {k: record[k] for k in ("image_id", "width", "height")}
    sample["draws"] = (random.random(), float(np.random.rand()), float(torch.rand(())))
    return sample


def _batches(records, start_iter: int, count: int, **kwargs) -> List[list]:
    """``count`` batches of (image_id, draws) from iteration ``start_iter`` of a fresh loader."""
    loader = ResumableTrainLoader(records, _draw_mapper, **{"batch_size": 3, "seed": 5, **kwargs})
    loader.seek(start_iter)
    batches = iter(loader)
    return [[(d["image_id"], d["draws"]) for d in next(batches)] for _ in range(count)]


@pytest.mark.parametrize(
    "dataset, grouping",
    [("shapes_train", True), ("shapes_train", False), ("shapes_lvis_train", True)],
    ids=["grouped", "ungrouped", "repeat-factors"],
)
def test_seek_continues_the_uninterrupted_batches(shapes_datasets, dataset, grouping):
    records = DatasetCatalog.get(dataset)
    options = {"aspect_ratio_grouping": grouping}
    if dataset == "shapes_lvis_train":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(records, 0.3)
        assert factors.max() > 1
        options["repeat_factors"] = factors
    full = _batches(records, 0, 100, **options)  # 300 samples: more than one epoch of 240
    for start in (1, 37, 81):
        assert _batches(records, start, 5, **options) == full[start : start + 5], start
    # the samples do not depend on the number of data workers
    assert _batches(records, 37, 5, num_workers=2, **options) == full[37:42]
    if grouping:
        wide = {r["image_id"]: r["width"] > r["height"] for r in records}
        assert all(len({wide[image_id] for image_id, _ in batch}) == 1 for batch in full)


def test_ranks_take_interleaved_positions_of_one_stream(shapes_datasets):
    records = DatasetCatalog.get("shapes_train")
    options = {"batch_size": 1, "aspect_ratio_grouping": False}
    single = [b[0] for b in _batches(records, 0, 480, **options)]
    ranks = [
        [b[0] for b in _batches(records, 0, 240, rank=rank, world_size=2, **options)]
        for rank in (0, 1)
    ]
    assert [sample for pair in zip(*ranks) for sample in pair] == single
    ids = [image_id for image_id, _ in single]
    assert sorted(ids[:240]) == sorted(ids[240:]) == sorted(r["image_id"] for r in records)
    assert ids[:240] != ids[240:]  # a new permutation each epoch


def test_repeat_factor_epochs_round_each_factor():
    factors = torch.tensor([1.0, 1.5, 2.25, 3.0])
    order = _EpochOrder(len(factors), seed=3, repeat_factors=factors)
    counts, position = [], 0
    for epoch in range(50):
        length = order._epoch_length(epoch)
        counts.append(np.bincount([order[position + i] for i in range(length)], minlength=4))
        position += length
    counts = np.stack(counts)
    low, high = np.floor(factors.numpy()), np.ceil(factors.numpy())
    assert ((low <= counts) & (counts <= high)).all()
    assert np.allclose(counts.mean(axis=0), factors.numpy(), atol=0.2)
    assert order[5] == _EpochOrder(len(factors), seed=3, repeat_factors=factors)[5]  # seekable


def test_mapping_leaves_the_callers_rngs_alone(shapes_datasets):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    _batches(DatasetCatalog.get("shapes_train"), 3, 2)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]


def test_trainer_resumes_its_seed_and_stream_position(shapes_datasets, tmp_path):
    def trainer(max_iter):
        opts = ["DATALOADER.NUM_WORKERS", 0, "SEED", -1, "SOLVER.MAX_ITER", max_iter]
        opts += ["OUTPUT_DIR", str(tmp_path)]
        return Trainer(load_config(SHAPES_CONFIG, [*TINY, *opts]))

    first = trainer(2)  # SEED -1: a seed is drawn, and saved in the checkpoints
    first.resume_or_load(resume=True)
    assert (first.start_iter, first.data_loader.start_iter) == (0, 0)
    first.train()
    second = trainer(4)
    second.seed = first.seed + 1  # what a second draw would most likely give
    second.resume_or_load(resume=True)
    assert second.start_iter == 2 and second.seed == first.seed
    assert (second.data_loader.seed, second.data_loader.start_iter) == (first.seed, 2)
    # SimpleTrainer creates the loader's iterator at the first step, after the seek
    assert second._trainer._data_loader_iter_obj is None
