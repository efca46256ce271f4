"""SLURM through submitit (hybrid_d2.engine.slurm, tools/submit.py), run with submitit's
LocalExecutor: a 2-task CPU job (two Detectron2 machines of one gloo process each) is preempted
mid-run with the signal SLURM sends, saves a checkpoint at its current iteration, is requeued and
ends bitwise equal to an uninterrupted job; a second run in its OUTPUT_DIR is refused.
tools/slurm_selftest.sh does the same on a real SLURM (docs/reliability.md)."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import submitit

from conftest import REPO_ROOT, SHAPES_CONFIG
from hybrid_d2.engine import OutputDirLock, UsageError
from hybrid_d2.engine.slurm import distributed_flags, parse_submit_args, submit
from test_resume import _check_same_run

MAX_ITER = 5
OVERRIDES = [
    "MODEL.DEVICE", "cpu",
    "SOLVER.IMS_PER_BATCH", 2,  # 1 image per process
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", 160,
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.CHECKPOINT_PERIOD", 100,  # no periodic checkpoint: a resume needs the preemption's
    "SOLVER.WRITER_PERIOD", 1,
    "TEST.EVAL_PERIOD", 0,
    "DATASETS.TEST", "()",
    "SOLVER.MAX_ITER", MAX_ITER,
    "SEED", 7,
]  # fmt: skip
TIMEOUT_S = 300


@pytest.fixture
def job_env(shapes_datasets, monkeypatch):
    """The environment the local jobs inherit: the datasets, one thread per process."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(shapes_datasets))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")


def _submit(job_dir: Path, out: Path) -> submitit.Job:
    args = parse_submit_args(
        ["--job-dir", str(job_dir), "--cpu", "--gpus-per-node", "2", "--tasks-per-node", "2",
         "--timeout", "10", "--cluster", "local",
         "--config-file", str(SHAPES_CONFIG), *map(str, OVERRIDES), "OUTPUT_DIR", str(out)]
    )  # fmt: skip
    return submit(
        args.train_argv, args.job_dir, gpus_per_node=args.gpus_per_node, cpu=args.cpu,
        tasks_per_node=args.tasks_per_node, timeout_min=args.timeout, cluster=args.cluster,
    )  # fmt: skip


def _tasks(job: submitit.Job) -> List[int]:
    """The pids of the local job's task processes (children of its controller)."""
    controller = job._process.pid
    with open(f"/proc/{controller}/task/{controller}/children") as f:
        return [int(pid) for pid in f.read().split()]


def _wait_for_log(job: submitit.Job, pattern: str) -> re.Match:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and not job.done():
        log = job.task(0).paths.stdout
        if log.exists():
            match = re.search(pattern, log.read_text())
            if match:
                return match
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} in the job's log:\n{job.task(0).paths.stdout.read_text()[-3000:]}")


def test_preempted_job_is_requeued_and_resumes_exactly(job_env, tmp_path):
    out = tmp_path / "preempted"
    job = _submit(tmp_path / "jobs", out)
    # the uninterrupted reference meanwhile: the same 2 gloo processes, on one Detectron2 machine
    reference = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train_net.py"), "--num-gpus", "2",
         "--config-file", str(SHAPES_CONFIG), *map(str, OVERRIDES),
         "OUTPUT_DIR", str(tmp_path / "reference")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_log(job, r"\biter: 1\b")
        with pytest.raises(UsageError, match="is in use by another run"):
            OutputDirLock(str(out))  # a second run in the job's OUTPUT_DIR is refused
        for pid in _tasks(job):  # as SLURM: every task gets the signal
            os.kill(pid, signal.SIGUSR2)
        job.results()  # the requeued job's
        _, stderr = reference.communicate(timeout=TIMEOUT_S)
        assert reference.returncode == 0, stderr[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
    log = job.task(0).paths.stdout.read_text()
    saved = re.search(r"Checkpoint saved after iteration (\d+); requeuing", log)
    assert saved, log[-3000:]
    iteration = int(saved[1])
    assert iteration < MAX_ITER - 1, "preempted after the last iteration: nothing was tested"
    assert f"Starting training from iteration {iteration + 1}" in log, log[-3000:]
    assert not (out / f"model_{iteration - 1:07d}.pth").exists()
    _check_same_run(out, tmp_path / "reference", MAX_ITER, f"preempted after {iteration}")


def test_each_task_is_one_detectron2_machine(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09]")
    flags = distributed_flags(submitit.JobEnvironment())
    assert flags[:4] == ["--num-machines", "3", "--machine-rank", "2"]
    assert re.fullmatch(r"tcp://gpu07:\d+", flags[5]), flags
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job: another port
    assert distributed_flags(submitit.JobEnvironment())[5] != flags[5]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks-per-node", "2"], "tasks_per_node > 1 is for CPU runs"),
        (["--gpus-per-node", "0"], "each must be at least 1"),
        (["--num-machines", "2"], "are set for each task"),
    ],
)
def test_submit_refuses_bad_settings_in_one_line(argv, message, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("hybrid_d2_submit", REPO_ROOT / "tools/submit.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    status = tool.main(
        ["--job-dir", str(tmp_path), "--cluster", "local", *argv, "--config-file", "x.yaml"]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir()), "nothing is submitted"
