"""Running hybrid_d2 models: the Trainer of train_net.py, safe launching of its processes and a safe
predictor."""

from .launch import (
    USER_ERRORS,
    OutputDirLock,
    UsageError,
    build_config,
    check_run_config,
    launch_checked,
    launch_workers,
    parse_train_args,
    share_cpu_cores,
    untrained_warning,
)
from .predictor import SafePredictor
from .trainer import Trainer

__all__ = [
    "OutputDirLock",
    "SafePredictor",
    "Trainer",
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
