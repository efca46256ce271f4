"""Training on a SLURM cluster through ``submitit``, with checkpoint-and-requeue on preemption.

**One task per node.** Detectron2's ``launch`` starts one process per GPU of its machine itself
(``--num-gpus``) and derives each process's rank and CUDA device from its machine's rank and its
index on the machine; so each SLURM task is one Detectron2 machine: ``--num-machines`` is the
number of tasks, ``--machine-rank`` the task's rank, and ``--dist-url`` the first node's host
with a port derived from the job id (the same on every node without any exchange). A task
running one process per GPU would make every process rank 0 of its own one-GPU "machine".
Several tasks on one node (``tasks_per_node``) are for CPU runs only: each task is then one
machine on that node, which is how the tests exercise the multi-machine path on one host.

**Each task** (:class:`TrainingJob`) runs ``train_net.py`` as a child process, with the
distributed flags added, and supervises it: the child dies with the task (PDEATHSIG) and ignores
the preemption signal, which SLURM also sends to a task's children.

**Preemption and timeout.** SLURM signals the tasks (submitit's ``--signal=USR2@<delay>``, or
``scancel --signal=USR2``); submitit calls :meth:`TrainingJob.checkpoint` in task 0. It asks the
run to stop (a request file, seen by rank 0 and broadcast to every rank after each iteration);
every rank finishes its iteration, rank 0 saves ``model_<iteration>.pth`` (atomically, as the
periodic checkpoints) and acknowledges, and submitit requeues the job with ``--resume``, which
continues exactly (docs/reliability.md). A run that is killed without the signal (``scontrol
requeue``, node failure) resumes from its last periodic checkpoint the same way. OUTPUT_DIR's lock
refuses a second run in the same folder.
"""

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence

import cloudpickle
import submitit
from submitit.helpers import DelayedSubmission
import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..checkpoint.resume import running_state
from ..utils import atomic_output

__all__ = [
    "PREEMPTION_REQUEST_VARIABLE",
    "PreemptionCheckpointer",
    "Preempted",
    "TrainingJob",
    "distributed_flags",
    "preemption_hooks",
    "submit",
]

logger = logging.getLogger("detectron2")  # the run's log

# Set by TrainingJob for train_net.py: the file whose existence asks the run to stop.
PREEMPTION_REQUEST_VARIABLE = "HYBRID_D2_PREEMPTION_REQUEST"
_ACK_SUFFIX = ".done"  # written by rank 0 once the checkpoint is saved: the iteration
_PORT_BASE, _PORT_RANGE = 20000, 20000
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.2


class Preempted(BaseException):
    """Raised on every rank after the preemption checkpoint. A BaseException, as
    KeyboardInterrupt, so that Detectron2's trainer does not log it as a failure."""


def distributed_flags(env: submitit.JobEnvironment) -> List[str]:
    """train_net.py's ``--num-machines``, ``--machine-rank`` and ``--dist-url`` for this task
    (one task = one Detectron2 machine); none for a single task, whose processes find a free
    local port themselves."""
    if env.num_tasks == 1:
        return []
    port = (
        _PORT_BASE
        + zlib.crc32(f"{env.job_id}:{_restart_count()}".encode()) % _PORT_RANGE
    )
    return [
        "--num-machines",
        str(env.num_tasks),
        "--machine-rank",
        str(env.global_rank),
        "--dist-url",
        f"tcp://{env.hostnames[0]}:{port}",
    ]


def _restart_count() -> str:
    """SLURM's count of this job's requeues: a requeued job gets a fresh port."""
    return os.environ.get("SLURM_RESTART_COUNT", "0")


class TrainingJob:
    """What each SLURM task runs: ``train_net.py ARGV`` as one Detectron2 machine; submitit calls
    :meth:`checkpoint` on preemption or timeout.

    Args:
        script: the path of train_net.py.
        argv: its arguments (``--num-gpus``, ``--config-file``, KEY VALUE overrides...), without
            the distributed flags, which each task adds.
    """

    def __init__(self, script: str, argv: Sequence[str]):
        self.script = os.path.abspath(script)
        self.argv = list(argv)
        self._child: Optional[subprocess.Popen] = None
        self._request: Optional[str] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {"script": self.script, "argv": self.argv}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["script"], state["argv"])

    def __call__(self) -> int:
        """Run train_net.py; returns 0, raises RuntimeError with its exit status otherwise."""
        env = submitit.JobEnvironment()
        self._request = os.path.join(
            env.paths.folder, f"{env.job_id}_preemption_request"
        )
        if env.global_rank == 0:
            for path in (self._request, self._request + _ACK_SUFFIX):
                if os.path.exists(path):
                    os.unlink(path)
        command = [sys.executable, self.script, *distributed_flags(env), *self.argv]
        print(
            f"Task {env.global_rank} of job {env.job_id}: {' '.join(command)}",
            flush=True,
        )
        self._child = subprocess.Popen(
            command,
            env=dict(os.environ, **{PREEMPTION_REQUEST_VARIABLE: self._request}),
            preexec_fn=_child_setup,
        )
        status = self._child.wait()
        if status != 0:
            raise RuntimeError(
                f"train_net.py exited with status {status}: {' '.join(command)}"
            )
        return status

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """submitit's preemption callback (task 0): have the run save a checkpoint at its current
        iteration and stop, then requeue this job with ``--resume``."""
        if self._child is not None and _running(self._child.pid):
            open(self._request, "w").close()
            ack = self._request + _ACK_SUFFIX
            while not os.path.exists(ack) and _running(self._child.pid):
                time.sleep(_POLL_S)
            if os.path.exists(ack):
                with open(ack) as f:
                    iteration = f.read().strip()
                print(
                    f"Checkpoint saved after iteration {iteration}; requeuing",
                    flush=True,
                )
        argv = self.argv if "--resume" in self.argv else ["--resume", *self.argv]
        return DelayedSubmission(TrainingJob(self.script, argv))


def _running(pid: int) -> bool:
    """Whether the child has not exited, without reaping it (the signal handler must not take
    the Popen's lock, which the interrupted ``wait`` may hold)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # reaped already
        return False


def _child_setup() -> None:
    """In train_net.py's process before it starts: die with the task, ignore the preemption
    signal (the task handles it; its processes inherit the ignoring)."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)


class PreemptionCheckpointer(HookBase):
    """After each iteration, stop on a preemption request: rank 0 checks the request file and
    tells every rank; then every rank's running state is gathered, rank 0 saves
    ``model_<iteration>`` and writes the acknowledgement, and every rank raises
    :class:`Preempted`. Register it on every rank, after the checkpointer. The last iteration is
    never interrupted: the run then ends as usual."""

    def __init__(self, request: str):
        self._request = request
        self._group = None

    def before_train(self):
        if comm.get_world_size() > 1:
            self._group = dist.new_group(
                backend="gloo"
            )  # a CPU flag, whatever the backend

    def after_step(self):
        iteration = self.trainer.iter
        flag = torch.tensor([comm.is_main_process() and os.path.exists(self._request)])
        if self._group is not None:
            dist.broadcast(flag, src=0, group=self._group)
        if not flag.item() or iteration >= self.trainer.max_iter - 1:
            return
        self.trainer.running_states = comm.all_gather(running_state(self.trainer.model))
        if comm.is_main_process():
            self.trainer.checkpointer.save(
                f"model_{iteration:07d}", iteration=iteration
            )
            with atomic_output(self._request + _ACK_SUFFIX) as tmp_path, open(
                tmp_path, "w"
            ) as f:
                f.write(f"{iteration}\n")
        logger.info(f"Preempted: stopping after iteration {iteration}")
        raise Preempted(iteration)


def preemption_hooks() -> List[HookBase]:
    """The :class:`PreemptionCheckpointer` of a run started by :class:`TrainingJob`; none
    otherwise."""
    request = os.environ.get(PREEMPTION_REQUEST_VARIABLE)
    return [PreemptionCheckpointer(request)] if request else []


def submit(
    train_argv: Sequence[str],
    job_dir: str,
    nodes: int = 1,
    gpus_per_node: int = 8,
    cpu: bool = False,
    tasks_per_node: int = 1,
    partition: Optional[str] = None,
    timeout_min: int = 4320,
    signal_delay_s: int = 120,
    cpus_per_task: Optional[int] = None,
    cluster: Optional[str] = None,
    script: Optional[str] = None,
) -> submitit.Job:
    """Submit ``train_net.py TRAIN_ARGV`` as a submitit job (tools/submit.py's flags).

    Each of ``nodes * tasks_per_node`` tasks is a Detectron2 machine with ``gpus_per_node /
    tasks_per_node`` processes (GPUs, or CPU processes with ``cpu``). ``cluster``: submitit's
    (None: SLURM if ``sbatch`` is found, "local" for tests).

    Raises:
        ValueError naming the bad setting.
    """
    if nodes < 1 or tasks_per_node < 1 or gpus_per_node < 1:
        raise ValueError(
            f"nodes={nodes}, tasks_per_node={tasks_per_node}, gpus_per_node={gpus_per_node}: "
            "each must be at least 1"
        )
    if gpus_per_node % tasks_per_node:
        raise ValueError(
            f"gpus_per_node={gpus_per_node} is not a multiple of tasks_per_node"
        )
    if tasks_per_node > 1 and not cpu:
        raise ValueError(
            "tasks_per_node > 1 is for CPU runs (--cpu): GPU runs take one task per node, "
            "Detectron2's launch starts one process per GPU"
        )
    if any(
        flag in train_argv
        for flag in ("--num-machines", "--machine-rank", "--dist-url")
    ):
        raise ValueError(
            "--num-machines, --machine-rank and --dist-url are set for each task"
        )
    if script is None:
        script = os.path.join(os.path.dirname(__file__), "..", "..", "train_net.py")
    processes = gpus_per_node // tasks_per_node
    executor = submitit.AutoExecutor(folder=job_dir, cluster=cluster)
    executor.update_parameters(
        name="hybrid_d2",
        nodes=nodes,
        tasks_per_node=tasks_per_node,
        gpus_per_node=0 if cpu else gpus_per_node,
        cpus_per_task=cpus_per_task or (processes if cpu else 10 * processes),
        timeout_min=timeout_min,
        slurm_signal_delay_s=signal_delay_s,
        **({"slurm_partition": partition} if partition else {}),
    )
    argv = ["--num-gpus", str(processes), *train_argv]
    # TrainingJob travels by value: a task then needs submitit only, not hybrid_d2 (whose import
    # takes seconds, Detectron2's and timm's included); train_net.py imports it
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return executor.submit(TrainingJob(script, argv))


def parse_submit_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """tools/submit.py's command line: its own flags, then train_net.py's (``--config-file``,
    ``--resume``, KEY VALUE overrides) as they are."""
    parser = argparse.ArgumentParser(
        description="Submit train_net.py to SLURM (submitit); see README, 'On a SLURM cluster'.",
        usage="%(prog)s [submit flags] --config-file FILE [--resume] [KEY VALUE ...]",
    )
    parser.add_argument(
        "--job-dir", required=True, help="submitit's folder: logs, pickles"
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="processes per node"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="CPU processes (gloo), no GPUs"
    )
    parser.add_argument(
        "--tasks-per-node",
        type=int,
        default=1,
        help="with --cpu: machines per node (tests)",
    )
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument(
        "--timeout", type=int, default=4320, help="minutes per job (requeued)"
    )
    parser.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds between the signal and the kill",
    )
    parser.add_argument(
        "--cpus-per-task", type=int, help="default: 10 per GPU, 1 per CPU process"
    )
    parser.add_argument(
        "--cluster", choices=["slurm", "local"], help="default: slurm if found"
    )
    args, train_argv = parser.parse_known_args(argv)
    if "--config-file" not in train_argv:
        parser.error("--config-file FILE is required (train_net.py's)")
    args.train_argv = train_argv
    return args
