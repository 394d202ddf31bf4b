# Two commands matter on a fresh machine: `make train` and `make test`. Both create .venv and install detkit first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detkit-installed
CONFIG ?= configs/lwdetr_vit.yaml
ARGS ?=
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
	$(PY) tools/train.py $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
