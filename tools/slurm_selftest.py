#!/usr/bin/env python
"""The job part of tools/slurm_selftest.sh, on a running SLURM: a 2-task CPU shapes job submitted
with tools/submit.py is preempted mid-run (``scancel --signal=USR2``: what SLURM sends before a
timeout or a preemption), then requeued mid-run by ``scontrol requeue``; its metrics and final
weights must equal those of an uninterrupted run of train_net.py with the same 2 processes."""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from hybrid_d2.data import ensure_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml"
MAX_ITER = 12
OVERRIDES = [
    "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", "160", "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "4",
    "SOLVER.WRITER_PERIOD", "1", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
    "SOLVER.MAX_ITER", str(MAX_ITER), "SEED", "7",
]  # fmt: skip
TIMEOUT_S = 900


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for(job_id: str, path: Path, pattern: str, count: int = 1) -> re.Match:
    """The ``count``-th match of ``pattern`` in the job's log; exit if the job ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        matches = list(re.finditer(pattern, path.read_text())) if path.exists() else []
        if len(matches) >= count:
            return matches[count - 1]
        if job_state(job_id) in ("FAILED", "CANCELLED", "COMPLETED"):
            break
        time.sleep(0.2)
    sys.exit(f"error: no {pattern!r} (x{count}) in {path}; job {job_id}: {job_state(job_id)}")


def job_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-o", "State"], capture_output=True, text=True
    )
    return out.stdout.strip()


def losses(out: Path) -> Dict[int, Dict[str, float]]:
    """Each iteration's losses and lr in metrics.json (a resumed run's record last)."""
    records = {}
    for line in (out / "metrics.json").read_text().splitlines():
        record = json.loads(line)
        if "total_loss" in record:
            records[record["iteration"]] = {
                k: v for k, v in record.items() if k == "lr" or "loss" in k
            }
    return records


def compare(out: Path, reference: Path) -> List[str]:
    """The differences between the two runs' metrics and final weights."""
    problems = []
    got, expected = losses(out), losses(reference)
    if sorted(got) != list(range(MAX_ITER)) or got != expected:
        problems.append(f"metrics differ: {got} != {expected}")
    weights = torch.load(out / "model_final.pth", weights_only=True)["model"]
    reference_weights = torch.load(reference / "model_final.pth", weights_only=True)["model"]
    different = [k for k in reference_weights if not torch.equal(weights[k], reference_weights[k])]
    if weights.keys() != reference_weights.keys() or different:
        problems.append(f"final weights differ: {different[:5]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", type=Path, required=True)
    work = parser.parse_args().work_dir
    datasets = work / "datasets"
    ensure_shapes_dataset("shapes", datasets)
    os.environ["DETECTRON2_DATASETS"] = str(datasets)
    job_dir, out, reference = work / "jobs", work / "preempted", work / "reference"
    submitted = subprocess.run(
        [sys.executable, str(REPO / "tools/submit.py"), "--job-dir", str(job_dir), "--cluster",
         "slurm", "--cpu", "--gpus-per-node", "2", "--tasks-per-node", "2", "--timeout", "60",
         "--config-file", str(CONFIG), *OVERRIDES, "OUTPUT_DIR", str(out)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    job_id = re.search(r"Submitted job (\S+);", submitted)[1]
    log = job_dir / f"{job_id}_0_log.out"
    say(f"submitted job {job_id} (2 tasks, 1 CPU process each); task 0's log: {log}")
    say("reference: train_net.py --num-gpus 2, uninterrupted, meanwhile")
    reference_run = subprocess.Popen(
        [sys.executable, str(REPO / "train_net.py"), "--num-gpus", "2", "--config-file",
         str(CONFIG), *OVERRIDES, "OUTPUT_DIR", str(reference)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    wait_for(job_id, log, r"\biter: 2\b")
    say(f"job at iteration 2: scancel --signal=USR2 {job_id}")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    saved = wait_for(job_id, log, r"Checkpoint saved after iteration (\d+); requeuing")
    say(f"task 0: {saved[0]}")
    start = wait_for(job_id, log, r"Starting training from iteration (\d+)", count=2)
    say(f"requeued job: {start[0]}")
    iteration = int(start[1]) + 2
    wait_for(job_id, log, rf"\biter: {iteration}\b", count=1)
    say(f"job at iteration {iteration}: scontrol requeue {job_id}")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    start = wait_for(job_id, log, r"Starting training from iteration (\d+)", count=3)
    say(f"requeued job: {start[0]}")
    deadline = time.monotonic() + TIMEOUT_S
    while job_state(job_id) != "COMPLETED":
        if time.monotonic() > deadline or job_state(job_id) in ("FAILED", "CANCELLED"):
            sys.exit(f"error: job {job_id} is {job_state(job_id)}; see {log}")
        time.sleep(1)
    say(f"job {job_id}: {job_state(job_id)}")
    if reference_run.wait() != 0:
        sys.exit(f"error: the reference run failed; see {reference}/log.txt")
    problems = compare(out, reference)
    for problem in problems:
        say(f"FAILED: {problem}")
    if not problems:
        say(f"PASSED: iterations 0-{MAX_ITER - 1} have the reference's losses and lr, and the "
            "final weights are bitwise equal")  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
