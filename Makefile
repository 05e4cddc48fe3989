# agvm: every set-up step is here, so a fresh clone needs only `make demo` or `make test`.
#   make install    create .venv, install pinned requirements, detectron2, and agvm (idempotent)
#   make test       install if needed, then the fast test suite (~minutes on 2 CPU cores)
#   make test-fast  the quick selection for an edit-test loop (marked `fast`, no multi-process tests; about a minute)
#   make test-slow  the long tests (marked `slow`)
#   make test-install  `pip install .` into a fresh venv + install_detectron2.sh (marked `install`)
#   make demo       install if needed, then the demo: AGVM vs its μ = 1 twin at batch 32 (CPU, ~5 min)
#   make pretrained  build (or verify) the mini pretrained backbone agvm-pretrained://shapes_r18 (CPU, ~2 min, once)
#   make clean      remove .venv and output/

PYTHON3 ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.agvm-installed
PYTEST_ARGS ?=

.PHONY: reproduce-mini install test test-fast test-slow test-install demo pretrained clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml scripts/install_detectron2.sh
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	PYTHON=$(PY) scripts/install_detectron2.sh
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)
	@echo "agvm installed in $(VENV)"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "fast and not ddp and not slow and not install" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-install: install
	$(PY) -m pytest -m install $(PYTEST_ARGS)

demo: install
	$(PY) scripts/demo.py

# the mini configs' pretrained backbone, cached under $AGVM_DATASETS (train_net.py builds it when missing)
pretrained: install
	$(PY) -m agvm.data.pretrained

clean:
	rm -rf $(VENV) output

# The scaled-down reproduction (2 cores; resumable): results/mini/README.md
reproduce-mini: install
	$(PY) scripts/reproduce_mini.py
