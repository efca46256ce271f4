"""train_net.py on semantic segmentation: training with SemSegEvaluator after it (single-scale and
multi-scale + flip), --eval-only reproducing it, exact resume after kill -9 with 1 and 2
processes, and 2 gloo processes computing the gradients of 1 process with both images."""
import functools
import pickle

import pytest
import torch
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

from conftest import REPO_ROOT, load_config, run_script
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


def _copypaste(log: str) -> list:
    return [line.split("copypaste: ")[1] for line in log.splitlines() if "copypaste: " in line]


def test_training_evaluates_single_scale_and_tta_and_eval_only_reproduces_it(shapes_sem_seg_datasets, tmp_path):
    config = SHAPES / "mixformer_b1_upernet_shapes.yaml"
    test_size = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 256, "TEST.AUG.RATIOS", "(0.75, 1.0)"]
    train = run_script(
        "train_net.py",
        ["--config-file", config, *SMALL, *test_size, "OUTPUT_DIR", tmp_path / "train"],
        shapes_sem_seg_datasets,
    )
    assert train.returncode == 0, train.stderr[-5000:]
    metrics = _copypaste(train.stdout + train.stderr)
    assert metrics[0::3] == ["Task: sem_seg", "Task: sem_seg_TTA"]
    assert metrics[1::3] == ["mIoU,fwIoU,mACC,pACC"] * 2
    assert (tmp_path / "train/inference_TTA/shapes_sem_seg_val/sem_seg_predictions.json").is_file()
    again = run_script(
        "train_net.py",
        ["--config-file", config, "--eval-only", *SMALL, *test_size,
         "MODEL.WEIGHTS", tmp_path / "train/model_final.pth", "OUTPUT_DIR", tmp_path / "eval"],
        shapes_sem_seg_datasets,
    )
    assert again.returncode == 0, again.stderr[-5000:]
    assert _copypaste(again.stdout + again.stderr) == metrics


@pytest.mark.parametrize("head, processes", [("upernet", 1), ("semfpn", 2)])
def test_killed_run_resumes_exactly(head, processes, shapes_sem_seg_datasets, tmp_path):
    """SIGKILLed after iteration 2 and resumed from checkpoint 1: iterations 0-3 have the
    uninterrupted run's losses and lr, and the final weights are bitwise equal."""
    run = functools.partial(
        _launch, datasets_root=shapes_sem_seg_datasets, config=SHAPES / f"mixformer_b1_{head}_shapes.yaml",
        processes=processes, overrides=SMALL + NO_EVAL,
    )
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    assert run(reference, tmp_path / "reference.log", resume=False).wait(timeout=300) == 0, (
        (tmp_path / "reference.log").read_text()[-5000:])
    _killed_after_iteration_2(run, out, tmp_path / "killed.log")
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert run(out, tmp_path / "resumed.log", resume=True).wait(timeout=300) == 0
    assert "Starting training from iteration 2" in (tmp_path / "resumed.log").read_text()
    _check_same_run(out, reference, MAX_ITER, f"{head}, {processes} processes")


# --- data parallel ------------------------------------------------------------------------------

# The ADE20K configs of MixFormer-B1 UperNet and DMFormer-S Semantic FPN (SyncBN in backbone and
# heads) at 64x64, in float64 so that
# the comparison measures the parallelism (see test_multiprocess.py); no dropout and no drop path
# (their random masks depend on the batch layout).
PARALLEL_OPTS = [
    "MODEL.SEM_SEG_HEAD.DROPOUT", 0.0,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6,
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


def _worker(config: str, out_file: str) -> None:
    model = _model(config)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)  # as train_net.Trainer on CPU
    rank = comm.get_rank()
    _loss(ddp, _inputs()[rank : rank + 1]).backward()
    if rank == 0:
        with open(out_file, "wb") as f:
            pickle.dump({n: p.grad for n, p in model.named_parameters()}, f)


@pytest.mark.parametrize("config", ["mixformer_b1_upernet_160k.yaml", "dmformer_s_semfpn_40k.yaml"])
def test_two_processes_match_one_process_with_both_images(config, tmp_path):
    out_file = str(tmp_path / "grads.pkl")
    launch(_worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(config, out_file))
    with open(out_file, "rb") as f:
        distributed = pickle.load(f)
    model = _model(config)
    _loss(model, _inputs()).backward()
    single = {n: p.grad for n, p in model.named_parameters()}
    assert [n for n, g in single.items() if g is None] == []  # every parameter is used (DDP)
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
