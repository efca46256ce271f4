"""Synthetic official checkpoints, written the way the official code writes them: PaddleClas's
``paddle.save`` for MixFormer (a pickle of numpy arrays plus Paddle's name table) and DeiT-style
``main.py`` training checkpoints for DilateFormer (``model``, ``model_ema``, ``optimizer``,
``lr_scheduler``, ``epoch``, ``scaler`` and the command line as an ``argparse.Namespace``)."""

import argparse
import pickle
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch import nn

from hybrid_d2.backbones.mixformer import VARIANTS as MIXFORMER_VARIANTS
from hybrid_d2.layers import relative_position_index

PADDLE_NAME_TABLE = "StructuredToParameterName@@"


def mixformer_paddle_state(network: nn.Module, variant: str) -> Dict[str, np.ndarray]:
    """A MixFormer network's weights under the official Paddle names and layouts: Linear weights
    [in, out], BatchNorm statistics ``_mean``/``_variance``, the relative position index buffers,
    and the classification tail (norm, last_proj, head): the network's own if it is a
    ``MixFormerClassifier``, else random."""
    linears = {f"{n}.weight" for n, m in network.named_modules() if isinstance(m, nn.Linear)}
    official = {}
    for name, tensor in network.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        array = tensor.numpy().copy()
        if name in linears:
            array = array.T.copy()  # Paddle Linear weights are [in, out]
        name = name.replace(".running_mean", "._mean").replace(".running_var", "._variance")
        official[name] = array
    for name, _ in network.named_modules():
        if name.endswith(".attn"):
            official[f"{name}.relative_position_index"] = relative_position_index(7).numpy()
    c = 8 * MIXFORMER_VARIANTS[variant]["embed_dim"]
    rng = np.random.default_rng(0)
    tail = {
        "norm.weight": np.ones(c, np.float32),
        "norm.bias": np.zeros(c, np.float32),
        "last_proj.weight": rng.standard_normal((c, 1280), np.float32),
        "last_proj.bias": np.zeros(1280, np.float32),
        "head.weight": rng.standard_normal((1280, 1000), np.float32),
        "head.bias": np.zeros(1000, np.float32),
    }
    return {**tail, **official}  # a classifier network's own tail wins


def write_pdparams(path: Path, state: Dict[str, np.ndarray], numpy2: bool = False) -> None:
    """What ``paddle.save`` writes; ``numpy2``: as under numpy >= 2, whose pickles name
    ``numpy._core`` (written with protocol 2, whose text globals can be renamed in place)."""
    table = {name: f"param_{i}" for i, name in enumerate(state)}
    data = pickle.dumps({**state, PADDLE_NAME_TABLE: table}, protocol=2 if numpy2 else 4)
    if numpy2:
        assert b"numpy.core.multiarray\n" in data
        data = data.replace(b"numpy.core.multiarray\n", b"numpy._core.multiarray\n")
    path.write_bytes(data)


def dilateformer_official_state(network: nn.Module, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A DilateFormer network (built with norm="BN") as the official model's state dict: the same
    names, trained BatchNorm counters, and the classifier (norm, head): the network's own if it
    is a ``DilateFormerClassifier``, else random."""
    state = {k: v.clone() for k, v in network.state_dict().items()}
    for name in state:
        if name.endswith("num_batches_tracked"):  # 300 epochs of 1251 steps
            state[name] = torch.tensor(1251 * 300)
    channels = network.channels[-1]
    generator = torch.Generator().manual_seed(seed)
    tail = {
        "norm.weight": torch.ones(channels),
        "norm.bias": torch.zeros(channels),
        "head.weight": torch.randn(1000, channels, generator=generator),
        "head.bias": torch.zeros(1000),
    }
    return {**tail, **state}  # a classifier network's own tail wins


def write_deit_checkpoint(
    path: Path, model: Dict[str, torch.Tensor], model_ema: Dict[str, torch.Tensor]
) -> None:
    """A checkpoint as DeiT-style ``main.py`` (DilateFormer's, Dynamic Mobile-Former's) saves
    it: ``utils.save_on_master({...}, checkpoint_path)``."""
    params = [nn.Parameter(t.clone()) for t in model.values() if t.is_floating_point()][:4]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    args = argparse.Namespace(
        model="dilateformer_tiny", batch_size=128, epochs=300, input_size=224, drop_path=0.1,
        model_ema=True, model_ema_decay=0.99996, opt="adamw", lr=1e-3, weight_decay=0.05,
        sched="cosine", smoothing=0.1, mixup=0.8, cutmix=1.0, data_path="/data/imagenet",
        output_dir="output/dilateformer_tiny", device="cuda", seed=0, dist_url="env://",
        opt_betas=None, clip_grad=None,
    )
    torch.save(
        {
            "model": model,
            "model_ema": model_ema,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": {"t_initial": 300, "base_values": [1e-3], "last_epoch": 299},
            "epoch": 299,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                       "growth_interval": 2000, "_growth_tracker": 17},
            "args": args,
        },
        path,
    )


def dmf_classifier_tail(last_channels: int = 120, conv_channels: int = 960) -> dict:
    """The XXS classifier's tensors (paper Table 1): end_mobile2former, end_former, the dynamic
    1x1 conv 120 -> 960 with its kernel attention, its BatchNorm, FC1 1152 -> 1600, FC2 -> 1000."""
    bn = {s: torch.ones(conv_channels) for s in ("weight", "bias", "running_mean", "running_var")}
    tail = {
        "end_mobile2former.norm.weight": torch.ones(192),
        "end_mobile2former.norm.bias": torch.zeros(192),
        "end_mobile2former.q.weight": torch.randn(last_channels, 192),
        "end_mobile2former.fc.weight": torch.randn(192, last_channels),
        "end_former.token_attention.qkv.weight": torch.randn(576, 192),
        "end_former.mlp.fc1.weight": torch.randn(384, 192),
        "channel_conv.static_weight": torch.randn(conv_channels, last_channels, 1, 1),
        "channel_conv.weight": torch.randn(8, conv_channels, last_channels, 1, 1),
        "channel_conv.Kernel_Attention.net1.weight": torch.randn(192, 192 + last_channels, 1, 1),
        "channel_conv.Kernel_Attention.bn.num_batches_tracked": torch.tensor(5),
        "bn.num_batches_tracked": torch.tensor(5),
        "head.fc1.weight": torch.randn(1600, 960 + 192),
        "head.fc1.bias": torch.zeros(1600),
        "head.fc2.weight": torch.randn(1000, 1600),
        "head.fc2.bias": torch.zeros(1000),
    }
    tail.update({f"bn.{name}": t for name, t in bn.items()})
    return tail
