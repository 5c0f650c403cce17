# Two commands on a fresh machine:  `make build` (set up + run the default pipeline)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
QEMU     := /usr/bin/qemu-aarch64

.PHONY: setup build test test-fast dataset emulator browser clean

setup: $(VENV)/.installed dataset emulator

# torch + torchvision are installed first, pinned to the pair on this machine's disk (PyPI's build, runs on the CPU):
# the local 2.13.0+cpu wheel cannot load PyPI's torchvision, and an unpinned torch would pull another CUDA build.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	$(BIN)/pip check
	touch $@

# Fashion-MNIST (full 60k/10k, MIT) comes from Debian's dataset-fashion-mnist package.
dataset: $(FMNIST)
$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

# ARM targets are judged with ARM arithmetic: Debian's qemu-user (the dynamic qemu-aarch64, which loads edgekd's
# instruction-counting plugin) and debootstrap, from which edgekd makes its aarch64 environment on first use.
emulator: $(QEMU)
$(QEMU):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q qemu-user debootstrap

# Debian's chromium renders report.html headless in the tests only (the report page needs no browser to build).
browser: $(CHROMIUM)
$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q chromium

build: setup
	$(BIN)/edgekd build --target android-arm64

test: setup browser
	$(BIN)/python -m pytest -q

test-fast: setup browser
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs
