"""Inference on single images with the checkpoint loading train_net.py uses."""

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..checkpoint import SafeCheckpointer

__all__ = ["SafePredictor"]


class SafePredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (BGR image in, ``{"instances": ...}`` out), loading
    ``cfg.MODEL.WEIGHTS`` through :class:`SafeCheckpointer` as ``train_net.py`` does: a checkpoint
    of another variant or family is refused (``CheckpointMismatchError``), a file that is not a
    checkpoint raises ``CheckpointLoadError``, and nothing is unpickled that could run code.
    """

    def __init__(self, cfg: CfgNode):  # DefaultPredictor.__init__ with SafeCheckpointer
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        SafeCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"INPUT.FORMAT={self.input_format!r}: expected 'RGB' or 'BGR'"
            )
