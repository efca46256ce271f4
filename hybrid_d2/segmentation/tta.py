"""Multi-scale + flip test of a semantic segmentation model, as mmsegmentation's ``--aug-test``:
each scale resized from the original image, softmax probabilities averaged over every pass.
"""

from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from PIL import Image
from torch import nn

__all__ = ["SemanticSegmentorWithTTA", "tta_sizes"]


def tta_sizes(
    height: int, width: int, short: int, long: int, ratios: Sequence[float]
) -> List[Tuple[int, int]]:
    """(H, W) of each ratio's pass: short side ``short * r``, long side at most ``long * r``,
    aspect ratio kept (mmseg ``img_ratios`` of ``img_scale=(long, short)``)."""
    return [
        T.ResizeShortestEdge.get_output_shape(height, width, short * r, long * r)
        for r in ratios
    ]


class SemanticSegmentorWithTTA(nn.Module):
    """Wraps a ``SemanticSegmentor``. Its inputs must hold the **original** image (a test loader
    with ``SemSegDatasetMapper(cfg, is_train=False, augmentations=[])``): each ratio of
    ``TEST.AUG.RATIOS`` times (``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST``) is resized from it
    (bilinear, as the single-scale test), and flipped too with ``TEST.AUG.FLIP``. Each pass's logits
    come back at the original size (the model resizes them to ``height``/``width``); their softmax
    probabilities, flipped back, are averaged: ``{"sem_seg": (K, H, W) probabilities}``.
    """

    def __init__(self, cfg: CfgNode, model: nn.Module):
        super().__init__()
        self.model = (
            model.module
            if isinstance(model, nn.parallel.DistributedDataParallel)
            else model
        )
        self.short, self.long = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        self.ratios = tuple(cfg.TEST.AUG.RATIOS)
        self.flip = cfg.TEST.AUG.FLIP
        if not self.ratios:
            raise ValueError(
                "TEST.AUG.RATIOS is empty: expected at least one test scale ratio"
            )

    def augmented_inputs(self, mapped: Dict) -> Iterator[Tuple[Dict, bool]]:
        """(model input, whether it is flipped) for every pass over one mapped input."""
        image = mapped["image"].permute(1, 2, 0).numpy()
        height, width = image.shape[:2]
        for new_height, new_width in tta_sizes(
            height, width, self.short, self.long, self.ratios
        ):
            resize = T.ResizeTransform(
                height, width, new_height, new_width, Image.BILINEAR
            )
            resized = resize.apply_image(image)
            for flipped in (False, True) if self.flip else (False,):
                pixels = resized[:, ::-1] if flipped else resized
                tensor = torch.as_tensor(
                    np.ascontiguousarray(pixels.transpose(2, 0, 1))
                )
                yield {
                    "image": tensor,
                    "height": mapped["height"],
                    "width": mapped["width"],
                }, flipped

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        return [self._inference_one(mapped) for mapped in batched_inputs]

    def _inference_one(self, mapped: Dict) -> Dict[str, torch.Tensor]:
        total, passes = None, 0
        for model_input, flipped in self.augmented_inputs(mapped):
            probabilities = self.model([model_input])[0]["sem_seg"].softmax(dim=0)
            if flipped:
                probabilities = probabilities.flip(dims=[-1])
            total = probabilities if total is None else total + probabilities
            passes += 1
        return {"sem_seg": total / passes}
