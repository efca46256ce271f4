# hybrid_d2 developer entry points. `make install` is idempotent (a stamp file records success).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hybrid_d2-installed
QUICK_CONFIG ?= configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml
QUICK_OUTPUT ?= output/quickstart

.PHONY: install test quickstart benchmark clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py tools/install_detectron2.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools<81" wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps lvis==0.5.3
	tools/install_detectron2.sh $(PY)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Train a MixFormer-B1 Mask R-CNN on the shapes data on CPU, evaluate it with COCOEvaluator (the
# AP table is printed at the end) and draw its predictions on a few val images. After 300
# iterations from scratch the detector's scores peak around 0.3-0.4, hence the drawing threshold.
quickstart: install
	$(PY) train_net.py --config-file $(QUICK_CONFIG) OUTPUT_DIR $(QUICK_OUTPUT)
	$(PY) demo/demo.py --config-file $(QUICK_CONFIG) --confidence-threshold 0.3 \
		--input "$${DETECTRON2_DATASETS:-datasets}/shapes/val/00000[1-4].png" \
		--output $(QUICK_OUTPUT)/predictions --opts MODEL.WEIGHTS $(QUICK_OUTPUT)/model_final.pth

# The backbone parameter check first (seconds), then the suite.
test: install
	$(PY) tools/model_zoo.py --check
	$(PY) -m pytest -x -q -n 2 --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV) output build *.egg-info
