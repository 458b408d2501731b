# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel of torch unless a GPU is present (an unpinned torch pulls a multi-GB CUDA build).
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test test-sglang sglang-env lint bench clean

$(BIN)/treepo: client/pyproject.toml service/pyproject.toml trainer/pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e client[redis] -e service[plot] -e trainer -r requirements-dev.txt
	@touch $(BIN)/treepo

setup: $(BIN)/treepo

demo: setup
	$(BIN)/treepo demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The real SGLang server in its own environment (it pins its own torch and transformers); ~3 min, ~7 GB, once.
SGLANG_VENV ?= .venv-sglang
SGLANG_REQ  := tests/sglang/requirements-sglang.txt
$(SGLANG_VENV)/.installed: $(SGLANG_REQ)
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(SGLANG_VENV)/bin/pip install -q --no-deps sglang==0.5.23
	$(SGLANG_VENV)/bin/pip install -q -r $(SGLANG_REQ)
	@touch $@

sglang-env: $(SGLANG_VENV)/.installed

# Integration suite against real SGLang servers (tests/sglang); `make test` leaves it out.
test-sglang: setup sglang-env
	SGLANG_PYTHON=$(SGLANG_VENV)/bin/python $(BIN)/python -m pytest -q -p no:cacheprovider --timeout 900 tests/sglang

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(SGLANG_VENV) runs .pytest_cache .ruff_cache
