# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# GSM8K beside the checkout when present; else mathtune tries $$MATHTUNE_DATA, the Hub, then generated problems.
DATA ?= $(wildcard ../shared/data/gsm8k)
DATA_ENV := $(if $(DATA),MATHTUNE_DATA=$(abspath $(DATA)),)

.PHONY: install demo test bench bench-eval clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-gigabyte CUDA build on CPU machines.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,cpu]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(DATA_ENV) $(VENV)/bin/mathtune run

test: install
	$(DATA_ENV) $(PY) -m pytest -q -ra

# Training speed and memory against TRL's documented setup (about 6 minutes on 2 CPU cores with AMX, 20 without).
bench: install
	$(DATA_ENV) $(PY) bench/bench_train.py

bench-eval: install
	$(DATA_ENV) $(PY) bench/bench_eval.py

clean:
	rm -rf $(VENV) runs
