#!/usr/bin/env python
"""Train and evaluate any hybrid_d2 config with Detectron2.

    python train_net.py --config-file configs/mixformer_b4_mask_rcnn_3x.yaml --num-gpus 8
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml --num-gpus 2

Without CUDA, ``--num-gpus N`` starts N CPU processes that communicate through gloo.
"""
import logging
import os
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from hybrid_d2 import add_hybrid_config
from hybrid_d2.config import merge_config_file
from hybrid_d2.data import DatasetMapper, check_dataset_files
from hybrid_d2.evaluation import build_evaluator
from hybrid_d2.solver import build_optimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer with hybrid_d2's optimizer, evaluators, guarded data and CPU multi-process."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__, except that DDP gets device_ids only for CUDA models, so that
        # several CPU processes (gloo) work too.
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        if comm.get_world_size() > 1:
            device_ids = [comm.get_local_rank()] if model.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=DatasetMapper(cfg, is_train=False)
        )


def setup(args) -> CfgNode:
    """Config from defaults + hybrid_d2 keys + the yaml + command-line overrides."""
    cfg = get_cfg()
    add_hybrid_config(cfg)
    merge_config_file(cfg, args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available; "
            "add `MODEL.DEVICE cpu` to the command line"
        )
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    for name in cfg.DATASETS.TEST + (() if args.eval_only else cfg.DATASETS.TRAIN):
        check_dataset_files(name)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logging.getLogger("detectron2").info("Command Line Args: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
