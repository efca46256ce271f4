"""Shared fixtures: a private datasets root with the generated shapes data, and a train_net runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from hybrid_d2.data import ensure_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO_ROOT / "configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml"


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory) -> Path:
    """A DETECTRON2_DATASETS root holding the generated shapes instances dataset."""
    root = tmp_path_factory.mktemp("d2_datasets")
    ensure_shapes_dataset("shapes", root)
    return root


def run_script(script: str, args, datasets_root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
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
