"""The Trainer of ``train_net.py``: Detectron2's ``DefaultTrainer`` with hybrid_d2's optimizer,
evaluators, checked data and CPU multi-process, and training that survives faults
(docs/reliability.md)."""

import logging
import os
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    hooks,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager
from fvcore.nn.precise_bn import get_bn_modules
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (
    RunningStateGatherer,
    SafeCheckpointer,
    StepSeeder,
    restore_running_states,
)
from ..data import DatasetMapper, SemSegDatasetMapper
from ..data.resumable import (
    SEEKABLE_SAMPLERS,
    build_resumable_train_loader,
    train_dataset_dicts,
    training_seed,
)
from ..evaluation import build_evaluator
from ..segmentation import SemanticSegmentorWithTTA
from ..solver import build_lr_scheduler, build_optimizer

__all__ = ["Trainer"]

logger = logging.getLogger("detectron2")


class Trainer(DefaultTrainer):
    """DefaultTrainer with hybrid_d2's optimizer, evaluators, guarded data and CPU multi-process,
    and training that survives faults:

    * checkpoints through :class:`SafeCheckpointer` (atomic, finite, safe loading); temporary
      files of a killed save are removed at start; nothing is saved or evaluated after an
      iteration failed (e.g. the FloatingPointError of a NaN loss);
    * exact resume: the run's seed (``SEED``, or one drawn at the first start) is saved in the
      checkpoint; the training stream is seekable (``hybrid_d2.data.resumable``) and is set to the
      resumed iteration before the first step; :class:`StepSeeder` seeds each iteration; every
      process's running statistics that Detectron2 keeps outside the state dict (RetinaNet's loss
      normalizer) are gathered into each checkpoint (:class:`RunningStateGatherer`).
    """

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__, except that DDP gets device_ids only for CUDA models, so that
        # several CPU processes (gloo) work too.
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.seed = training_seed(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg, seed=self.seed)
        if comm.get_world_size() > 1:
            device_ids = (
                [comm.get_local_rank()] if model.device.type == "cuda" else None
            )
            model = DistributedDataParallel(
                model, device_ids=device_ids, broadcast_buffers=False
            )
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        if comm.is_main_process():
            self.checkpointer.remove_stale_temp_files()
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._failed_iter: Optional[int] = (
            None  # the iteration being run, until it completed
        )
        # every rank's running_state (e.g. RetinaNet's loss normalizer) at the last checkpoint
        self.running_states: Optional[List[Dict[str, float]]] = None
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True) -> None:
        """DefaultTrainer's, then the training stream is set to the first iteration to run."""
        super().resume_or_load(resume=resume)
        if hasattr(self.data_loader, "seek"):
            self.data_loader.seek(self.start_iter, self.seed)
            logger.info(
                f"Training stream of seed {self.seed} from iteration {self.start_iter}"
            )
        elif self.start_iter > 0:
            logger.warning(
                f"Resuming at iteration {self.start_iter} with a data loader that cannot seek: "
                "its stream restarts from the beginning."
            )

    def train(self):
        """DefaultTrainer's; a run resumed after its last iteration (killed while saving
        model_final) writes the missing model_final from the last checkpoint first.

        TorchScript functions (Detectron2's focal loss) run unoptimized: TorchScript optimizes a
        function after its first calls, which changes its rounding, so that a resumed run would
        compute its first iterations differently from the uninterrupted run."""
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        finished = (
            self.start_iter >= self.max_iter and self.checkpointer.has_checkpoint()
        )
        if finished and comm.is_main_process() and not os.path.exists(final):
            self.checkpointer.save("model_final", iteration=self.iter)
        with torch.jit.optimized_execution(False):
            return super().train()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["seed"] = self.seed
        if self.running_states is not None:
            state["running_states"] = self.running_states
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "running_states" in state_dict:
            self.running_states = state_dict["running_states"]
            restore_running_states(self.model, self.running_states)
        if "seed" not in state_dict:
            logger.warning(
                f"The checkpoint has no seed; resuming with seed {self.seed}."
            )
            return
        if self.cfg.SEED >= 0 and state_dict["seed"] != self.cfg.SEED:
            logger.warning(
                f"SEED is {self.cfg.SEED} but the checkpoint was trained with seed "
                f"{state_dict['seed']}; resuming with the checkpoint's."
            )
        self.seed = int(state_dict["seed"])

    def before_step(self):
        self._failed_iter = self.iter
        super().before_step()

    def after_step(self):
        super().after_step()
        self._failed_iter = None

    def after_train(self):
        if self._failed_iter is not None:
            self.checkpointer.disable_saving(
                f"training failed at iteration {self._failed_iter}"
            )
        super().after_train()

    def build_hooks(self):
        """DefaultTrainer's hooks, with :class:`StepSeeder` first, writers every
        ``SOLVER.WRITER_PERIOD`` iterations, no evaluation after a failed iteration, and the
        checkpointer last: an iteration's metrics (and evaluation) are written before its
        checkpoint exists, so that a run killed in between redoes and rewrites them on resume
        (Detectron2 saves before evaluating and writing, so that such a kill loses them). The
        price: an evaluation that raises also prevents that iteration's checkpoint."""
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # save some memory and time for PreciseBN
        precise_bn = None
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            precise_bn = (
                hooks.PreciseBN(  # before evaluation and checkpointing, as Detectron2
                    cfg.TEST.EVAL_PERIOD,
                    self.model,
                    self.build_train_loader(cfg, seed=self.seed),
                    cfg.TEST.PRECISE_BN.NUM_ITER,
                )
            )
        ret = [StepSeeder(), hooks.IterationTimer(), hooks.LRScheduler(), precise_bn]
        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._test_and_save_results))
        if _uses_sem_seg_tta(cfg):  # multi-scale + flip once, after training
            ret.append(hooks.EvalHook(0, self._test_with_tta))
        ret.append(RunningStateGatherer(cfg.SOLVER.CHECKPOINT_PERIOD, self.max_iter))
        if comm.is_main_process():
            ret.append(
                hooks.PeriodicWriter(
                    self.build_writers(), period=cfg.SOLVER.WRITER_PERIOD
                )
            )
            ret.append(
                hooks.PeriodicCheckpointer(
                    self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD
                )
            )
        return ret

    def _test_and_save_results(self):
        if self._failed_iter is not None:
            logger.warning(
                f"Not evaluating: training failed at iteration {self._failed_iter}"
            )
            return {}
        self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    def _test_with_tta(self):
        if self._failed_iter is not None:
            return {}
        return self.test_with_TTA(self.cfg, self.model)

    def build_writers(self):
        """Detectron2's default writers; metrics.json smooths over ``SOLVER.WRITER_PERIOD``."""
        output_dir = self.cfg.OUTPUT_DIR
        PathManager.mkdirs(output_dir)
        json_file = os.path.join(output_dir, "metrics.json")
        _drop_partial_last_line(json_file)
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(json_file, window_size=self.cfg.SOLVER.WRITER_PERIOD),
            TensorboardXWriter(output_dir),
        ]

    @classmethod
    def evaluate(cls, cfg: CfgNode, model: nn.Module) -> OrderedDict:
        """:meth:`test`, then :meth:`test_with_TTA` where the config asks for it."""
        results = cls.test(cfg, model)
        if _uses_sem_seg_tta(cfg):
            results.update(cls.test_with_TTA(cfg, model))
        return results

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(
            cfg.OUTPUT_DIR, "inference", dataset_name
        )
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def test_with_TTA(cls, cfg, model) -> OrderedDict:
        """Multi-scale + flip test of a semantic segmentation model (``TEST.AUG``), each scale
        resized from the original image; results keyed ``<task>_TTA`` (e.g. ``sem_seg_TTA``).
        """
        tta_model = SemanticSegmentorWithTTA(cfg, model)
        original = SemSegDatasetMapper(cfg, is_train=False, augmentations=[])
        results = OrderedDict()
        for name in cfg.DATASETS.TEST:
            loader = build_detection_test_loader(cfg, name, mapper=original)
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name)
            evaluator = cls.build_evaluator(cfg, name, output_folder=output_folder)
            result = inference_on_dataset(tta_model, loader, evaluator)
            results[name] = OrderedDict(
                (f"{task}_TTA", value) for task, value in result.items()
            )
            if comm.is_main_process():
                logger.info(
                    f"Multi-scale + flip evaluation results for {name} in csv format:"
                )
                print_csv_format(results[name])
        return list(results.values())[0] if len(results) == 1 else results

    @classmethod
    def build_train_loader(cls, cfg, seed: Optional[int] = None):
        """A seekable :class:`ResumableTrainLoader` (at iteration 0 of ``seed``'s stream; default
        ``training_seed(cfg)``); Detectron2's loader for samplers it does not cover. Both read
        the records checked by ``train_dataset_dicts``."""
        mapper = _mapper(cfg, is_train=True)
        if cfg.DATALOADER.SAMPLER_TRAIN not in SEEKABLE_SAMPLERS:
            logger.warning(
                f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r} is not seekable (only "
                f"{', '.join(SEEKABLE_SAMPLERS)}): using Detectron2's loader, which --resume "
                "restarts from the beginning of its stream."
            )
            return build_detection_train_loader(
                cfg, mapper=mapper, dataset=train_dataset_dicts(cfg)
            )
        seed = training_seed(cfg) if seed is None else seed
        return build_resumable_train_loader(cfg, mapper, seed)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=_mapper(cfg, is_train=False)
        )


def _mapper(cfg: CfgNode, is_train: bool):
    """The semantic segmentation mapper for SemanticSegmentor, Detectron2's mapper otherwise."""
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        return SemSegDatasetMapper(cfg, is_train=is_train)
    return DatasetMapper(cfg, is_train=is_train)


def _uses_sem_seg_tta(cfg: CfgNode) -> bool:
    """Whether ``cfg`` asks for a multi-scale + flip test of a semantic segmentation model."""
    return cfg.TEST.AUG.ENABLED and cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"


def _drop_partial_last_line(path: str) -> None:
    """Cut an incomplete last line (a process killed while appending) off a json-lines file."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
