"""The timing loop shared by every mode: alternating rounds, median and range."""

import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import nn


def progress(text: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def no_sync() -> None:
    """Nothing to wait for (CPU work is synchronous)."""


def synchronizer(device: str) -> Callable[[], None]:
    """What makes a timed call wait for ``device``'s queued work."""
    return torch.cuda.synchronize if device.startswith("cuda") else no_sync


def alternate(
    calls: Dict[str, Callable[[], object]],
    warmup: int,
    rounds: int,
    sync: Callable[[], None] = no_sync,
    label: str = "run",
) -> Dict[str, List[float]]:
    """Seconds per call of each of ``calls``: ``warmup`` untimed rounds, then ``rounds`` timed
    ones; every round runs each call once, in turn."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for r in range(-warmup, rounds):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            if r >= 0:
                times[name].append(time.perf_counter() - start)
                progress(f"  {label} round {r + 1}/{rounds}: {name} {times[name][-1]:.3f} s")
    return times


def inference(model: nn.Module, image: torch.Tensor) -> Callable[[], Any]:
    """A call of ``model`` on ``image`` under ``torch.no_grad``."""

    def call() -> Any:
        with torch.no_grad():
            return model(image)

    return call


def spread(values: Sequence[float], scale: float = 1.0) -> Dict[str, float]:
    """Median, min and max of ``values`` times ``scale``."""
    values = [v * scale for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
