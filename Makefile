# Two commands do all the set-up (see README.md):
#   make demo   create .venv, install, run every notebook (CPU-sized) into runs/
#   make test   create .venv, install, run the test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch==2.13.0 first: on a CPU machine that is the CPU wheel; the project's
# torch range is then already satisfied, so no multi-GB CUDA build is pulled.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m deblur_lib.notebook

test: $(STAMP)
	$(PY) -m pytest -q

# every benchmark in turn, JSON to benchmarks/results/; on a GPU: make bench DEVICE=cuda
DEVICE  ?= cpu
BENCHES := guard_overhead throughput data_loading loss_metrics quality
bench: $(STAMP)
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py --device $(DEVICE) || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check deblur_lib tests benchmarks
	$(VENV)/bin/ruff format --check deblur_lib tests benchmarks

clean:
	rm -rf $(VENV) runs data mlflow.db mlruns
