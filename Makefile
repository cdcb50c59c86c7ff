# Every target installs the project into .venv first when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= vgg16_cifar.yaml
ARGS   ?=

.PHONY: install fit test smoke lint tensorboard clean bench tta

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

# Speed on this machine: VGG16-BN at batch 128 in fp32 and bf16 (the plain loop: the shipped
# recipe's cutout, weight EMA, bf16 and channels_last off), the shipped recipe as it is, and the small
# network of the allocator issue at batch 512 (where glibc's mmap churn shows). Results in bench/*.json.
PLAIN := --set train.precision=fp32 --set train.channels_last=null --set data.cutout=0 \
	--set optim.ema_decay=null
SMALL_NET := --set model.arch=custom --set "model.layers=[64, M, 64, 256, M, 256, 256, M, 256]" \
	--set model.global_pool=max --set train.batch_size=512 --set train.precision=bf16 \
	--set train.channels_last=true
bench: install
	$(BIN)/vggtrain bench --config vgg16_cifar.yaml $(PLAIN) --json bench/vgg16_fp32.json $(ARGS)
	$(BIN)/vggtrain bench --config vgg16_cifar.yaml $(PLAIN) --set train.precision=bf16 --json bench/vgg16_bf16.json $(ARGS)
	$(BIN)/vggtrain bench --config vgg16_cifar.yaml --json bench/vgg16_shipped.json $(ARGS)
	$(BIN)/vggtrain bench --config vgg16_cifar.yaml $(PLAIN) $(SMALL_NET) --json bench/small_bf16_b512.json $(ARGS)

# Time to accuracy (docs/recipes.md, "Time to accuracy"): train TTA_CONFIG, measure the test
# set along the way, print when it first reached TARGET; curve and result in bench/tta_*.json.
# The defaults are docs/results/fast_cpu.md's measurement: make tta SEED=1
TTA_CONFIG ?= fast_cpu.yaml
TARGET     ?= 0.90
BUDGET_MIN ?= 30
SEED       ?= 0
TTA_FLAGS  ?= --full --probe-every 13 --probe-from 19
TTA_NAME   := $(basename $(notdir $(TTA_CONFIG)))_seed$(SEED)
tta: install
	$(BIN)/python scripts/time_to_accuracy.py --config $(TTA_CONFIG) --target $(TARGET) \
		--budget-min $(BUDGET_MIN) --set seed=$(SEED) --set name=$(TTA_NAME) --force \
		--json bench/tta_$(TTA_NAME).json $(TTA_FLAGS) $(ARGS)
