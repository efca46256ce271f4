"""Starting a training or evaluation run safely: the command line, checks that fail fast with one
line, an OUTPUT_DIR that only one live run holds, and worker processes that die with their
launcher and share the CPU cores."""

import argparse
import ctypes
import fcntl
import logging
import os
import pickle
import signal
import sys
from typing import Any, Callable, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

from ..checkpoint import CheckpointLoadError, CheckpointMismatchError, SafeCheckpointer
from ..config import ConfigError, get_config
from .slurm import Preempted

__all__ = [
    "LOCK_FILE_NAME",
    "OutputDirLock",
    "USER_ERRORS",
    "UsageError",
    "build_config",
    "check_run_config",
    "launch_checked",
    "launch_workers",
    "parse_train_args",
    "share_cpu_cores",
    "untrained_warning",
]

logger = logging.getLogger(__name__)

# Flags of default_argument_parser that may also come after the KEY VALUE overrides.
_TRAILING_FLAGS = ("--resume", "--eval-only")
LOCK_FILE_NAME = ".hybrid_d2.lock"
_PR_SET_PDEATHSIG = 1
# Thread-count variables a user sets to choose the threads per process.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class UsageError(Exception):
    """A problem with the command line, config or files that the user must fix."""


# Errors that are the user's input (config, files, weights): reported in one line, exit status 2.
USER_ERRORS = (
    UsageError,
    ConfigError,
    CheckpointLoadError,
    CheckpointMismatchError,
    pickle.UnpicklingError,
)


def parse_train_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Detectron2's ``default_argument_parser``; ``--resume`` and ``--eval-only`` are also taken
    from among the trailing ``KEY VALUE`` overrides, where argparse would leave them. On one
    machine, ``--dist-url`` defaults to "auto" (a free local port) instead of Detectron2's port
    fixed per user, so that two multi-process runs of one user can share a machine."""
    parser = default_argument_parser()
    args = parser.parse_args(argv)
    if args.num_machines == 1 and args.dist_url == parser.get_default("dist_url"):
        args.dist_url = "auto"
    opts = []
    for token in args.opts:
        if token in _TRAILING_FLAGS:
            setattr(args, token[2:].replace("-", "_"), True)
        elif token.startswith("--"):
            parser.error(
                f"{token} after the KEY VALUE overrides: put it before them (only "
                f"{' and '.join(_TRAILING_FLAGS)} may come after)"
            )
        else:
            opts.append(token)
    if len(opts) % 2:
        parser.error(
            f"the overrides must be KEY VALUE pairs, got an odd number: {opts}"
        )
    args.opts = opts
    return args


def build_config(args: argparse.Namespace) -> CfgNode:
    """The frozen config: defaults + hybrid_d2 keys + ``args.config_file`` + ``args.opts``."""
    cfg = get_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available; "
            "add `MODEL.DEVICE cpu` to the command line"
        )
    cfg.freeze()
    return cfg


def launch_checked(
    main: Callable[[argparse.Namespace], Any], args: argparse.Namespace
) -> int:
    """Check the config and OUTPUT_DIR (one line and exit status 2 on a problem; a warning for an
    evaluation without weights), hold OUTPUT_DIR for this run, then run ``main(args)`` in its
    processes (:func:`launch_workers`)."""
    logging.getLogger("detectron2").info("Command Line Args: %s", args)
    try:
        cfg = build_config(args)
        check_run_config(cfg, args.eval_only)
        lock = OutputDirLock(cfg.OUTPUT_DIR) if args.machine_rank == 0 else None
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.eval_only and (warning := untrained_warning(cfg, args.resume)):
        print(warning, file=sys.stderr)
    try:
        return launch_workers(main, args)
    finally:
        if lock is not None:
            lock.release()


def check_run_config(cfg: CfgNode, eval_only: bool) -> None:
    """Fail fast, before any process starts, on a config that cannot run.

    Raises:
        UsageError: SOLVER.MAX_ITER <= 0 for training, a MODEL.WEIGHTS file that is missing or
            is not a checkpoint, or an OUTPUT_DIR that cannot be created or written.
    """
    if not eval_only and cfg.SOLVER.MAX_ITER <= 0:
        raise UsageError(
            f"SOLVER.MAX_ITER={cfg.SOLVER.MAX_ITER}: training needs at least 1 iteration"
        )
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights:
        if not os.path.isfile(weights):
            raise UsageError(f"MODEL.WEIGHTS: file not found: {weights}")
        _check_readable_checkpoint(weights)
    _check_writable_dir(cfg.OUTPUT_DIR)


def untrained_warning(cfg: CfgNode, resume: bool = False) -> Optional[str]:
    """The line to print when a model for inference gets no weights: MODEL.WEIGHTS empty (and,
    with ``resume``, no checkpoint in OUTPUT_DIR); None otherwise."""
    checkpoint = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")  # what --resume loads
    if cfg.MODEL.WEIGHTS or (resume and os.path.isfile(checkpoint)):
        return None
    return (
        "warning: MODEL.WEIGHTS is empty: the model is untrained (random weights) and its "
        "predictions are meaningless; add MODEL.WEIGHTS <checkpoint>"
    )


def _check_readable_checkpoint(path: str) -> None:
    """Read the file as SafeCheckpointer (train_net.py's and the demo's loader) will."""
    try:
        SafeCheckpointer(torch.nn.Module()).read(path)
    except OSError as e:
        raise UsageError(f"MODEL.WEIGHTS: cannot read {path}: {e.strerror or e}") from e


def _check_writable_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            f"OUTPUT_DIR {path!r} cannot be written: {e.strerror or e}"
        ) from e


class OutputDirLock:
    """An exclusive lock on an OUTPUT_DIR for the lifetime of this process (``fcntl.flock``: the
    system releases it when the process ends, however it ends, so it is never stale)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE_NAME)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise UsageError(
                f"OUTPUT_DIR {output_dir!r} is in use by another run (pid {holder}); wait for it "
                "to end, stop it, or choose another OUTPUT_DIR"
            ) from None
        self._file.truncate(0)
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def launch_workers(
    main: Callable[[argparse.Namespace], Any], args: argparse.Namespace
) -> int:
    """Run ``main(args)`` in ``args.num_gpus`` processes per machine with Detectron2's ``launch``.

    Each spawned process dies with this one (even when this one is killed with SIGKILL). A
    :data:`USER_ERRORS` error in a process is printed in one line. Returns the exit status (2 for
    such an error).
    """
    spawned = (
        args.num_gpus * args.num_machines > 1
    )  # Detectron2's launch spawns processes
    try:
        launch(
            _worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main, args, os.getpid() if spawned else None),
        )
    except SystemExit as e:  # a single process: _worker's own exit
        return int(e.code or 0)
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code == 2:  # the process has printed its error
            return 2
        raise
    return 0


def _worker(
    main: Callable[[argparse.Namespace], Any],
    args: argparse.Namespace,
    launcher_pid: Optional[int],
) -> None:
    if launcher_pid is not None:
        _die_with(launcher_pid)
    try:
        main(args)
    except Preempted as e:  # the preemption checkpoint is saved: end normally
        logging.getLogger("detectron2").info(
            f"Process {comm.get_rank()} stopped after iteration {e.args[0]} (preempted)"
        )
    except USER_ERRORS as e:
        prefix = f"process {comm.get_rank()}: " if comm.get_world_size() > 1 else ""
        print(f"error: {prefix}{e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _die_with(launcher_pid: int) -> None:
    """Have the kernel kill this process when its parent (the launcher) dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        logger.warning(
            "prctl(PR_SET_PDEATHSIG) failed: this process may outlive its launcher"
        )
    if os.getppid() != launcher_pid:  # the launcher died before the prctl
        os._exit(1)


def share_cpu_cores(cfg: CfgNode) -> Optional[int]:
    """Give each of this machine's CPU processes its share of the cores.

    With several processes per machine on CPU (``--num-gpus N`` without CUDA), PyTorch would give
    each of them every core, and they would slow each other down; unless ``OMP_NUM_THREADS`` or
    ``MKL_NUM_THREADS`` is set, each gets ``cores // N`` threads (at least 1). Returns the thread
    count it set, or None.
    """
    processes = comm.get_local_size()
    if cfg.MODEL.DEVICE != "cpu" or processes < 2:
        return None
    if any(os.environ.get(name) for name in _THREAD_VARIABLES):
        return None
    threads = max(1, len(os.sched_getaffinity(0)) // processes)
    torch.set_num_threads(threads)
    return threads
