"""Data-parallel training is batch-splitting invariant: 2 CPU processes (gloo, DDP as train_net.py
wraps the model) with 1 image each compute the gradients of 1 process with both images.

The models run in float64, so that the comparison measures the parallelism and not fp32 summation
order: in fp32 the synchronised BatchNorm's one-pass variance (E[x^2] - E[x]^2, Detectron2's
NaiveSyncBatchNorm) differs from BatchNorm's two-pass variance by ~1e-4 relative in some
gradients."""
import pickle
import socket

import pytest
import torch
from detectron2.engine import launch
from detectron2.modeling import build_backbone
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from conftest import REPO_ROOT, load_config

# Each family's COCO config, as trained on GPUs (MixFormer: SyncBN in the convolution branch;
# DilateFormer: FrozenBN; DMF: SyncBN, blocks 0-3 frozen, FrozenStatsBN on pooled vectors;
# DMFormer: SyncBN everywhere).
# Drop path is off: its per-sample masks depend on the batch layout.
CONFIGS = {
    "mixformer": "configs/mixformer_b1_mask_rcnn_1x.yaml",
    "dilateformer": "configs/dilateformer_t_mask_rcnn_1x.yaml",
    "dualformer": "configs/dualformer_t_mask_rcnn_1x.yaml",
    "dmf": "configs/dmf_s_mask_rcnn_1x.yaml",
    "dmformer": "configs/dmformer_s_mask_rcnn_1x.yaml",
}
_DROP_PATH_KEY = {
    "mixformer": "MODEL.MIXFORMER.DROP_PATH_RATE",
    "dilateformer": "MODEL.DILATEFORMER.DROP_PATH_RATE",
    "dualformer": "MODEL.DUALFORMER.DROP_PATH_RATE",
    "dmf": "MODEL.DMF.DROP_PATH_RATE",
    "dmformer": "MODEL.DMFORMER.DROP_PATH_RATE",
}


def _backbone(family: str) -> torch.nn.Module:
    cfg = load_config(REPO_ROOT / CONFIGS[family], [_DROP_PATH_KEY[family], 0.0])
    torch.manual_seed(0)
    return build_backbone(cfg).double().train()


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _per_image_loss(features: dict, generator_seed: int = 2) -> torch.Tensor:
    """Mean over images (and pixels) of fixed random projections of every FPN level."""
    generator = torch.Generator().manual_seed(generator_seed)
    loss = 0
    for name in sorted(features):
        weight = torch.randn(features[name].shape[1:], generator=generator, dtype=torch.float64)
        loss = loss + (features[name] * weight).mean()
    return loss


def _gradients(model: torch.nn.Module) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _worker(family: str, out_file: str) -> None:
    model = _backbone(family)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)  # as train_net.Trainer on CPU
    images = _images()
    rank = comm.get_rank()
    _per_image_loss(ddp(images[rank : rank + 1])).backward()
    if rank == 0:
        with open(out_file, "wb") as f:
            pickle.dump(_gradients(model), f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_two_processes_match_one_process_with_both_images(family, tmp_path):
    out_file = str(tmp_path / "grads.pkl")
    launch(_worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(family, out_file))
    with open(out_file, "rb") as f:
        distributed = pickle.load(f)

    model = _backbone(family)
    images = _images()
    _per_image_loss(model(images)).backward()
    single = _gradients(model)

    assert sorted(distributed) == sorted(single)
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
