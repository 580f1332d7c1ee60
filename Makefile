# Set-up and everyday commands. `make test` and `make demo` install into .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# CPU build of torch (on disk on the project machines; a plain `pip install torch` pulls a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0
# The oldest supported transformers release (pyproject.toml's lower bound), for `make test-compat`.
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= transformers==5.17.0

.PHONY: install test test-compat demo lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev,train]"
	touch $@

install: $(VENV)/.installed

# Kernels run under Triton's CPU interpreter here; on a GPU machine unset TRITON_INTERPRET.
test: install
	OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 $(PY) -m pytest -n 2 --dist loadgroup -q tests

$(COMPAT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q "$(TORCH_CPU)"
	$(COMPAT_VENV)/bin/python -m pip install -q -e . "$(COMPAT_TRANSFORMERS)" "pytest>=8"
	touch $@

# Compatibility smoke on the oldest supported transformers, in its own venv: convert -> forward -> cached
# generate -> training step -> save/load, trust_remote_code loading, HF conventions.
test-compat: $(COMPAT_VENV)/.installed
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -q tests/models/test_compat_smoke.py \
		tests/models/test_remote_code.py tests/models/test_l2a_hf_conventions.py

demo: install
	$(VENV)/bin/l2a demo --out runs/demo --force

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs .pytest_cache
