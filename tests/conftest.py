"""Shared fixtures: a private datasets root with the generated shapes data, and a train_net runner."""
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

from hybrid_d2.data import ensure_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO_ROOT / "configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml"

# Property tests draw the same examples on every run and machine (derandomized, no example
# database), so that one commit gives one result. HYPOTHESIS_PROFILE=explore draws new random
# examples each run, to search for failures locally.
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def _cpu_may_use_amx_bf16() -> bool:
    """Whether oneDNN may run bfloat16 on AMX here: the CPU has it and ONEDNN_MAX_CPU_ISA does not
    cap the ISA below it (the upstream bug of tests/test_upstream_bf16.py needs AMX)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            has_amx = "amx_bf16" in cpuinfo.read()
    except OSError:
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return has_amx and (isa == "ALL" or "AMX" in isa)


CPU_MAY_USE_AMX_BF16 = _cpu_may_use_amx_bf16()


def is_segmentation_config(path) -> bool:
    """Whether a config file is a semantic segmentation experiment (UperNet or Semantic FPN): those
    are tested by the test_segmentation_* files, the detector tests skip them."""
    return re.search(r"_(upernet|semfpn)_", Path(path).stem) is not None


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) each worker, and each script it starts, gets its share of
    the cores, so that N workers do not each start a thread per core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and not os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory) -> Path:
    """A DETECTRON2_DATASETS root holding the generated shapes instances dataset."""
    root = tmp_path_factory.mktemp("d2_datasets")
    ensure_shapes_dataset("shapes", root)
    return root


# A guard against hangs, not a speed check: the longest script run (160 training iterations) took
# 100-450 s on 2 busy cores, and 600 s was exceeded once with two suites sharing the cores.
SCRIPT_TIMEOUT_S = 1800


def run_script(
    script: str, args, datasets_root: Path, timeout: int = SCRIPT_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in a fresh interpreter with DETECTRON2_DATASETS set."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def randomize_batchnorms(module: nn.Module) -> None:
    """Move every BatchNorm's statistics and affine off their init, so that none is a no-op."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)


def register_shapes_under(root) -> None:
    """(Re-)register the eight shapes dataset names of this process under a datasets root."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from hybrid_d2.data import SHAPES_DATASET_NAMES, SHAPES_SEM_SEG_DATASET_NAMES, register_shapes_datasets

    for name in SHAPES_DATASET_NAMES + SHAPES_SEM_SEG_DATASET_NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_shapes_datasets(None if root is None else str(root))


@pytest.fixture(scope="session")
def shapes_datasets(datasets_root) -> Path:
    """datasets_root with all three shapes datasets, registered under it in this process (for
    in-process training and evaluation); the default registration is restored afterwards."""
    for kind in ("shapes", "shapes_keypoints", "shapes_lvis"):
        ensure_shapes_dataset(kind, datasets_root)
    register_shapes_under(datasets_root)
    yield datasets_root
    register_shapes_under(None)


def load_as_train_net_does(config: Path, weights: Path, monkeypatch):
    """Build ``config``'s detector and load ``weights`` with train_net.py's own steps for
    ``--eval-only MODEL.WEIGHTS`` (its config, its model, its checkpointer), on CPU.
    Returns the model and the checkpointer's report of incompatible keys."""
    from hybrid_d2.checkpoint import SafeCheckpointer
    from hybrid_d2.engine import Trainer, build_config, parse_train_args

    args = parse_train_args(
        ["--config-file", str(config), "--eval-only", "MODEL.WEIGHTS", str(weights),
         "MODEL.DEVICE", "cpu"]
    )  # fmt: skip
    cfg = build_config(args)
    model = Trainer.build_model(cfg)
    reports = []
    load_model = SafeCheckpointer._load_model
    monkeypatch.setattr(
        SafeCheckpointer, "_load_model",
        lambda self, checkpoint: reports.append(load_model(self, checkpoint)) or reports[-1],
    )  # fmt: skip
    SafeCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    (incompatible,) = reports
    return model, incompatible


@functools.lru_cache(maxsize=None)
def smallest_variant(name: str) -> str:
    """The variant of a registered family with the fewest network parameters."""
    from hybrid_d2.layers import FAMILIES

    family = FAMILIES[name]

    def parameters(variant: str) -> int:
        with torch.device("meta"):  # shapes only
            network = family.build_network(variant, 0.0, False, family.resolve_options({}))
        return sum(p.numel() for p in network.parameters())

    return min(family.variants, key=parameters)


def load_config(path, opts=()):
    """A config file merged over Detectron2's and hybrid_d2's defaults, on CPU."""
    from hybrid_d2 import get_config

    return get_config(str(path), ["MODEL.DEVICE", "cpu", *opts])


@pytest.fixture(scope="session")
def shapes_sem_seg_datasets(datasets_root) -> Path:
    """datasets_root with the generated shapes_sem_seg set (ADE20K layout), the shapes names
    registered under it in this process; the default registration is restored afterwards."""
    ensure_shapes_dataset("shapes_sem_seg", datasets_root)
    register_shapes_under(datasets_root)
    yield datasets_root
    register_shapes_under(None)
