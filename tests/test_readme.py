"""The README's Python example and Detectron2-tool wrapper, run as written."""
import re
import subprocess
import sys

import cv2
import numpy as np
import torch
from detectron2.modeling import build_model

from conftest import REPO_ROOT, load_config, run_script

README = (REPO_ROOT / "README.md").read_text()


def _python_example() -> str:
    section = README.split("## Using a model from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_example_predicts_with_saved_weights(tmp_path):
    code = _python_example()
    config = re.search(r'get_config\("([^"]+)"', code).group(1)
    weights, image = tmp_path / "model_final.pth", tmp_path / "input.jpg"
    torch.manual_seed(0)
    torch.save({"model": build_model(load_config(REPO_ROOT / config)).state_dict()}, weights)
    picture = np.full((120, 160, 3), 40, np.uint8)
    cv2.circle(picture, (50, 60), 30, (60, 20, 220), -1)
    cv2.imwrite(str(image), picture)
    code = code.replace('"model_final.pth"', repr(str(weights))).replace('"input.jpg"', repr(str(image)))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    count = int(result.stdout.split()[0])
    assert 0 <= count <= 100 and "Boxes(tensor(" in result.stdout


def test_detectron2_tools_run_with_hybrid_configs(datasets_root):
    config = "configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml"
    result = run_script(
        "tools/d2_tool.py", ["analyze_model", "--config-file", config, "--tasks", "parameter"],
        datasets_root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backbone.bottom_up.net" in result.stdout + result.stderr
    result = run_script("tools/d2_tool.py", ["no_such_tool"], datasets_root)
    assert result.returncode == 2 and "no Detectron2 tool 'no_such_tool'" in result.stderr
