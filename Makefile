# Two commands do all the set-up (see README.md):
#   make demo   create .venv, install, run every notebook (CPU-sized) into runs/
#   make test   create .venv, install, run the test suite
# Also: make lab (JupyterLab on notebooks/), make pretrain (the two runs behind the shipped
# weights, resumable), make figures (the README's PNGs), make bench, make lint.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean lab pretrain figures

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

# JupyterLab on notebooks/ with the project's kernel (the venv's python3); start with 00_data
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

# The guarded CPU runs behind deblur_lib/pretrained/: the fixed natural-photo test split,
# stage 1 (params/pretrain.yaml: 7,000 steps, mostly dead leaves), stage 2 (params/finetune.yaml:
# 1,500 steps on photo crops, from stage 1's weights; interrupt either and rerun: it resumes),
# then the export of the weights, the model card and the history, measured on the test split.
# Each stage hands on its last.pt, never best.pt: the test split only measures, it picks nothing.
PRETRAIN_NAME ?= deblur-guard-small
pretrain: $(STAMP)
	$(PY) -m deblur_lib.data synth --out data/pretrain --n_train 16 --n_test 60 --size 256 --seed 0
	$(PY) -m deblur_lib.train --config params/pretrain.yaml --resume auto
	$(PY) -m deblur_lib.train --config params/finetune.yaml --resume auto
	$(PY) -m deblur_lib.train.export runs/finetune/last.pt --test_data data/pretrain/test \
		--name $(PRETRAIN_NAME)

# The README's pictures, from the MLflow store of `make demo` and the shipped weights
figures: $(STAMP)
	$(PY) -m deblur_lib.notebook.readme --tracking_uri sqlite:///mlflow.db --out docs

# every benchmark in turn, JSON to benchmarks/results/; on a GPU: make bench DEVICE=cuda
# (the last, quality.py, trains the make pretrain recipe: about an hour on 2 CPU cores)
DEVICE  ?= cpu
BENCHES := guard_overhead throughput shared_cpu data_loading loss_metrics predict tiling ensemble quality
bench: $(STAMP)
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py --device $(DEVICE) || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check deblur_lib tests benchmarks
	$(VENV)/bin/ruff format --check deblur_lib tests benchmarks

clean:
	rm -rf $(VENV) runs data mlflow.db mlruns
