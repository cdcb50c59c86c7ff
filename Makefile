# Every target installs the project into .venv first when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= vgg16_cifar.yaml
ARGS   ?=

.PHONY: install fit test smoke lint tensorboard clean bench

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

clean: install  # as every target: a fresh checkout gets its .venv first
	rm -rf runs/smoke data/synthetic .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Speed on this machine: VGG16-BN at batch 128 in fp32 and bf16, and the small network of the
# allocator issue at batch 512 (where glibc's mmap churn shows). Results in bench/*.json.
SMALL_NET := --set model.arch=custom --set "model.layers=[64, M, 64, 256, M, 256, 256, M, 256]" \
	--set model.global_pool=max --set train.batch_size=512 --set train.precision=bf16 \
	--set train.channels_last=true
bench: install
	$(BIN)/vggtrain bench --config vgg16_cifar.yaml --json bench/vgg16_fp32.json $(ARGS)
	$(BIN)/vggtrain bench --config vgg16_cifar.yaml --set train.precision=bf16 --json bench/vgg16_bf16.json $(ARGS)
	$(BIN)/vggtrain bench --config vgg16_cifar.yaml $(SMALL_NET) --json bench/small_bf16_b512.json $(ARGS)
