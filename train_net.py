#!/usr/bin/env python
"""Train and evaluate any hybrid_d2 config with Detectron2.

    python train_net.py --config-file configs/mixformer_b4_mask_rcnn_3x.yaml --num-gpus 8
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml --num-gpus 2

Without CUDA, ``--num-gpus N`` starts N CPU processes that communicate through gloo. The Trainer
(hybrid_d2.engine.trainer) survives faults (docs/reliability.md): checkpoints are written
atomically and never with NaN/Inf weights, nothing is saved after a failed iteration, and
``--resume`` after a kill continues exactly where the last checkpoint left off.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import logging
import sys

from detectron2.config import CfgNode
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from hybrid_d2.checkpoint import SafeCheckpointer
from hybrid_d2.data import check_dataset_files
from hybrid_d2.engine import (
    Trainer,
    build_config,
    launch_checked,
    parse_train_args,
    share_cpu_cores,
)
from hybrid_d2.engine.slurm import preemption_hooks

logger = logging.getLogger("detectron2")


def setup(args) -> CfgNode:
    """The config, Detectron2's logging, config dump and seeding, and each CPU process's share
    of the cores."""
    cfg = build_config(args)
    default_setup(cfg, args)
    threads = share_cpu_cores(cfg)
    if threads is not None:
        logger.info(
            f"{threads} threads per process: {comm.get_local_size()} CPU processes share "
            "this machine's cores (set OMP_NUM_THREADS to choose)"
        )
    return cfg


def main(args):
    cfg = setup(args)
    for name in cfg.DATASETS.TEST + (() if args.eval_only else cfg.DATASETS.TRAIN):
        check_dataset_files(name)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.evaluate(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.register_hooks(preemption_hooks())  # SLURM jobs of tools/submit.py
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    sys.exit(launch_checked(main, parse_train_args()))
