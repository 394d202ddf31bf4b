# Two commands matter on a fresh machine: `make train` and `make test`. Both create .venv and install detkit first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detkit-installed
CONFIG ?= configs/lwdetr_vit.yaml
ARGS ?=
# `make train` with the default config promises under 10 minutes on a 2-core CPU: on a machine too slow for its 900
# steps in that time, train.max_minutes ends it at 9 minutes with the lr schedule fitted to the steps that fit (a fast
# machine or a GPU runs all 900, unchanged). TRAIN_MINUTES=0 turns the limit off; ARGS can set train.max_minutes too.
TRAIN_MINUTES ?= 9
PYTEST_ARGS ?=

.PHONY: install train test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# -c pins the tested torch/torchvision pair from the registry (never the local CPU-only torch wheel)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -c "import torch, torchvision; from torchvision.ops import nms; \
	  b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]]); \
	  assert nms(b, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]; \
	  print('torch', torch.__version__, '+ torchvision', torchvision.__version__, ': torchvision.ops works')"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(PY) tools/train.py $(CONFIG) $(if $(filter configs/lwdetr_vit.yaml,$(CONFIG)),train.max_minutes=$(TRAIN_MINUTES)) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
