"""train_net.py on semantic segmentation: training with SemSegEvaluator after it (single-scale and
multi-scale + flip), --eval-only reproducing it, exact resume after kill -9 (1 and 2 processes),
and 2 gloo processes computing the gradients of 1 process with both images. One short evaluated
UperNet run is shared by the evaluation and resume tests."""
import functools
import pickle
from pathlib import Path

import pytest
import torch
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

from conftest import REPO_ROOT, load_config
from test_multiprocess import _free_port
from test_resume import _check_same_run, _killed_after_iteration_2, _launch

SHAPES = REPO_ROOT / "configs" / "shapes"
ADE20K = REPO_ROOT / "configs" / "ade20k"
MAX_ITER = 4
SMALL = [
    "SOLVER.IMS_PER_BATCH", 2,
    "INPUT.MIN_SIZE_TRAIN", "(80,)",
    "INPUT.MAX_SIZE_TRAIN", 320,
    "INPUT.CROP.SIZE", "(64, 64)",
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.CHECKPOINT_PERIOD", 2,  # checkpoints after iterations 1 and 3 (final)
    "SOLVER.WRITER_PERIOD", 1,
    "SOLVER.MAX_ITER", MAX_ITER,
    "SEED", 7,
]
NO_EVAL = ["TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "TEST.AUG.ENABLED", False]
TEST_SIZE = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 256, "TEST.AUG.RATIOS", "(0.75, 1.0)"]
UPERNET = SHAPES / "mixformer_b1_upernet_shapes.yaml"


def _copypaste(log: str) -> list:
    return [line.split("copypaste: ")[1] for line in log.splitlines() if "copypaste: " in line]


def _run(out: Path, datasets_root: Path, overrides: list) -> list:
    """train_net.py in one process and one thread (as the resume runs), to completion; the
    evaluation's copypaste lines."""
    log = out.parent / f"{out.name}.log"
    proc = _launch(out, log, datasets_root, resume=False, config=UPERNET, overrides=overrides)
    assert proc.wait(timeout=300) == 0, log.read_text()[-5000:]
    return _copypaste(log.read_text())


@pytest.fixture(scope="module")
def upernet_run(shapes_sem_seg_datasets, tmp_path_factory):
    """One short UperNet run, evaluated after training (single-scale and TTA): (its output
    folder, the evaluation's copypaste lines). The tests below share it."""
    out = tmp_path_factory.mktemp("upernet") / "run"
    return out, _run(out, shapes_sem_seg_datasets, SMALL + TEST_SIZE)


def test_training_evaluates_single_scale_and_tta(upernet_run):
    out, metrics = upernet_run
    assert metrics[0::3] == ["Task: sem_seg", "Task: sem_seg_TTA"]
    assert metrics[1::3] == ["mIoU,fwIoU,mACC,pACC"] * 2
    assert (out / "inference_TTA/shapes_sem_seg_val/sem_seg_predictions.json").is_file()


def test_eval_only_reproduces_the_evaluation_after_training(upernet_run, shapes_sem_seg_datasets, tmp_path):
    out, metrics = upernet_run
    weights = ["MODEL.WEIGHTS", out / "model_final.pth", "--eval-only"]
    assert _run(tmp_path / "eval", shapes_sem_seg_datasets, SMALL + TEST_SIZE + weights) == metrics


def test_killed_run_resumes_exactly(upernet_run, shapes_sem_seg_datasets, tmp_path):
    """UperNet, 1 process, SIGKILLed after iteration 2 and resumed from checkpoint 1: iterations
    0-3 have the uninterrupted (shared, evaluated) run's losses and lr, and the final weights are
    bitwise equal. The runs here skip the evaluation, which does not change the training."""
    run = functools.partial(
        _launch, datasets_root=shapes_sem_seg_datasets, config=UPERNET,
        overrides=SMALL + TEST_SIZE + NO_EVAL,
    )  # fmt: skip
    out = tmp_path / "resumed"
    _killed_after_iteration_2(run, out, tmp_path / "killed.log")
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert run(out, tmp_path / "resumed.log", resume=True).wait(timeout=300) == 0
    assert "Starting training from iteration 2" in (tmp_path / "resumed.log").read_text()
    _check_same_run(out, upernet_run[0], MAX_ITER, "upernet, 1 process")


def test_two_process_run_resumes_exactly(shapes_sem_seg_datasets, tmp_path):
    """Semantic FPN, 2 processes, SIGKILLed (the whole process group) after iteration 2 and
    resumed from checkpoint 1: iterations 0-3 have the uninterrupted run's losses and lr (both
    ranks' batches), and the final weights are bitwise equal."""
    run = functools.partial(
        _launch, datasets_root=shapes_sem_seg_datasets,
        config=SHAPES / "mixformer_b1_semfpn_shapes.yaml", processes=2, overrides=SMALL + NO_EVAL,
    )  # fmt: skip
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    assert run(reference, tmp_path / "reference.log", resume=False).wait(timeout=300) == 0, (
        (tmp_path / "reference.log").read_text()[-5000:])
    _killed_after_iteration_2(run, out, tmp_path / "killed.log")
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert run(out, tmp_path / "resumed.log", resume=True).wait(timeout=300) == 0
    assert "Starting training from iteration 2" in (tmp_path / "resumed.log").read_text()
    _check_same_run(out, reference, MAX_ITER, "semfpn, 2 processes")


# --- data parallel ------------------------------------------------------------------------------

# The ADE20K configs of MixFormer-B1 UperNet and DMFormer-S Semantic FPN (SyncBN in backbone and
# heads) at 64x64, in float64 so that the comparison measures the parallelism (see
# test_multiprocess.py); no dropout and no drop path (their random masks depend on the batch
# layout). The heads are narrower than the configs' (64 channels for UperNet, FPN and Semantic
# FPN head; 32 for the auxiliary head): DDP broadcasts and all-reduces every parameter in float64,
# and the widths do not change what is compared.
PARALLEL_OPTS = [
    "MODEL.SEM_SEG_HEAD.DROPOUT", 0.0,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6,
    "MODEL.SEM_SEG_HEAD.UPERNET.CHANNELS", 64,
    "MODEL.SEM_SEG_HEAD.AUX.CHANNELS", 32,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 64,
    "MODEL.FPN.OUT_CHANNELS", 64,
    "MODEL.MIXFORMER.DROP_PATH_RATE", 0.0,
    "MODEL.DMFORMER.DROP_PATH_RATE", 0.0,
]


def _model(config: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(ADE20K / config, PARALLEL_OPTS)).double().train()


def _inputs() -> list:
    generator = torch.Generator().manual_seed(1)
    return [
        {"image": torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8),
         "sem_seg": torch.randint(0, 6, (64, 64), generator=generator)}
        for _ in range(2)
    ]


def _loss(model, inputs) -> torch.Tensor:
    with EventStorage():
        return sum(model(inputs).values())


PARALLEL_CONFIGS = ["mixformer_b1_upernet_160k.yaml", "dmformer_s_semfpn_40k.yaml"]


def _worker(out_file: str) -> None:
    """Each config's gradients from one image per process, under DDP; rank 0 writes them."""
    rank, gradients = comm.get_rank(), {}
    for config in PARALLEL_CONFIGS:
        model = _model(config)
        ddp = DistributedDataParallel(model, broadcast_buffers=False)  # as train_net.Trainer on CPU
        _loss(ddp, _inputs()[rank : rank + 1]).backward()
        gradients[config] = {n: p.grad for n, p in model.named_parameters()}
    if rank == 0:
        with open(out_file, "wb") as f:
            pickle.dump(gradients, f)


@pytest.fixture(scope="module")
def distributed_gradients(tmp_path_factory) -> dict:
    """config: parameter name: gradient, from 2 gloo processes (one launch for both configs)."""
    out_file = str(tmp_path_factory.mktemp("ddp") / "grads.pkl")
    launch(_worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(out_file,))
    with open(out_file, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("config", PARALLEL_CONFIGS)
def test_two_processes_match_one_process_with_both_images(config, distributed_gradients):
    distributed = distributed_gradients[config]
    model = _model(config)
    _loss(model, _inputs()).backward()
    single = {n: p.grad for n, p in model.named_parameters()}
    assert [n for n, g in single.items() if g is None] == []  # every parameter is used (DDP)
    assert distributed.keys() == single.keys()
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
