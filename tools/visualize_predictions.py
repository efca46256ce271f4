#!/usr/bin/env python
"""Draw a trained model's predictions on the first images of a dataset.

    python tools/visualize_predictions.py --config-file CFG --output out/ MODEL.WEIGHTS model.pth
"""
import argparse
import os
import sys

import cv2
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

from hybrid_d2 import add_hybrid_config
from hybrid_d2.config import merge_config_file
from hybrid_d2.utils import atomic_output


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--dataset", help="registered dataset (default: the first of DATASETS.TEST)")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = get_cfg()
    add_hybrid_config(cfg)
    merge_config_file(cfg, args.config_file, args.opts)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    predictor = DefaultPredictor(cfg)
    os.makedirs(args.output, exist_ok=True)
    for record in DatasetCatalog.get(dataset)[: args.num_images]:
        image_bgr = read_image(record["file_name"], format="BGR")  # DefaultPredictor takes BGR
        instances = predictor(image_bgr)["instances"].to("cpu")
        drawn = Visualizer(image_bgr[:, :, ::-1], metadata, scale=2.0).draw_instance_predictions(instances)
        name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        path = os.path.join(args.output, name)
        with atomic_output(path) as tmp_path:
            if not cv2.imwrite(tmp_path, drawn.get_image()[:, :, ::-1]):
                raise OSError(f"could not write {path}")
        print(f"{path}: {len(instances)} detections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
