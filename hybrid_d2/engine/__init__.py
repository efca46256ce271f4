"""Running hybrid_d2 models: safe launching of train_net.py's processes and a safe predictor."""

from .launch import (
    USER_ERRORS,
    OutputDirLock,
    UsageError,
    check_run_config,
    launch_workers,
    parse_train_args,
    share_cpu_cores,
    untrained_warning,
)
from .predictor import SafePredictor

__all__ = [
    "OutputDirLock",
    "SafePredictor",
    "USER_ERRORS",
    "UsageError",
    "check_run_config",
    "launch_workers",
    "parse_train_args",
    "share_cpu_cores",
    "untrained_warning",
]
