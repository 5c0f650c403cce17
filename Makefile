# Two commands on a fresh machine:  `make build` (set up + run the default pipeline)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium

.PHONY: setup build test test-fast dataset browser clean

setup: $(VENV)/.installed dataset browser

# torch is installed first and pinned, so pip never resolves a multi-GB CUDA build.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	$(BIN)/pip check
	touch $@

# Fashion-MNIST (full 60k/10k, MIT) comes from Debian's dataset-fashion-mnist package.
dataset: $(FMNIST)
$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

# Debian's chromium renders report.html headless in the tests (the report page itself needs no browser to build).
browser: $(CHROMIUM)
$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q chromium

build: setup
	$(BIN)/edgekd build --target android-arm64

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs
