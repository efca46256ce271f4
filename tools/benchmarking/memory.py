"""Peak memory of a block, fresh worker processes that measure it, and releasing what a process
holds before its workers run."""

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .paths import ENTRY, REPO_ROOT
from .timing import progress


@dataclass
class Memory:
    """MiB before a measured block (``base``) and at its high-water mark (``peak``)."""

    base: float = 0.0
    peak: float = 0.0

    @property
    def added(self) -> float:
        """What the block added at its peak."""
        return self.peak - self.base


def status_mib(field_name: str) -> float:
    """VmRSS (current), VmHWM (peak since the last reset) or another size field of this
    process's /proc/self/status, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field_name + ":"))
    return int(line.split()[1]) / 1024


@contextmanager
def peak_memory(device: str) -> Iterator[Memory]:
    """Memory of the block within: on CPU RSS before and peak RSS within (writing 5 to
    /proc/self/clear_refs resets the peak to the current RSS, so that what ran before does not
    mask it); on CUDA the allocated memory before and its maximum within."""
    memory = Memory()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory.base = torch.cuda.memory_allocated() / 2**20
        yield memory
        torch.cuda.synchronize()
        memory.peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory.base = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        yield memory
        memory.peak = status_mib("VmHWM")


def release_memory() -> float:
    """Collect unreachable objects (models in reference cycles among them), return glibc's free
    heap pages to the system (``malloc_trim``, where the C library has it) and empty CUDA's cache;
    returns the resident set size after, in MiB. The caller drops its references first."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return status_mib("VmRSS")


def run_worker(args: argparse.Namespace, name: str, memory: bool) -> dict:
    """The JSON that ``args.mode``'s worker prints for model ``name`` in a fresh interpreter (so
    that peak memory is its own). With ``memory``, glibc serves every block >= 64 KiB by mmap and
    unmaps it when freed, so the RSS high-water mark follows the live tensors instead of what the
    heap kept; the page faults this costs would distort latency."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    command = [sys.executable, ENTRY, *args.argv, "--worker", name]
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        command.append("--memory")
    progress(f"  {'memory' if memory else 'latency'} worker: {name}")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: benchmark worker failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
