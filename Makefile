# Every target installs the project into .venv first when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= vgg16_cifar.yaml
ARGS   ?=

.PHONY: install fit test smoke lint tensorboard clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $@

fit: install
	$(BIN)/vggtrain fit --config $(CONFIG) $(ARGS)

test: install
	$(BIN)/python -m pytest -q

smoke: install
	$(BIN)/python -m vggtrain.synthetic data/synthetic
	$(BIN)/vggtrain fit --config smoke.yaml --force $(ARGS)

lint: install
	$(BIN)/ruff check .

tensorboard: install
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf runs/smoke data/synthetic .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
