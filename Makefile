# `make quickstart`: set up .venv (once) and run the default study on the bundled digits data.
# `make test`: set up .venv (once), lint with ruff, run the whole test suite.
# `make numerics`: the tests marked `numerics` again on other CPU kernel paths (CI runs it).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint numerics

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/python run_study.py experiments/quickstart.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two pytest workers, one test file each at a time (--dist loadfile: a file's module fixtures
# are built once), the longest files first (tests/conftest.py: LONGEST_FIRST, kept in that
# order by --no-loadscope-reorder), the slowest tests' durations printed at the end.
test: lint
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20

# Values compared within a tolerance (goldens, K ranks against 1, reproduce across machines)
# must hold on any x86 CPU: torch's portable kernels, oneDNN capped at AVX2, and an AVX2-only
# CPU's paths (torch, MKL and oneDNN all at AVX2) stand for CPUs this machine is not.
numerics: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(VENV)/bin/python -m pytest -q -m numerics
	ONEDNN_MAX_CPU_ISA=AVX2 $(VENV)/bin/python -m pytest -q -m numerics
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
		$(VENV)/bin/python -m pytest -q -m numerics
