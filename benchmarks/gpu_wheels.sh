#!/usr/bin/env bash
# Download into .whl/ the wheels that the GPU machine lacks for `python -m benchmarks.gpu_stages`.
# That machine has torch, transformers, numpy, pillow, safetensors, huggingface_hub, pyarrow, tokenizers,
# regex, requests, filelock and packaging, but no diffusers and no pydantic, and no network: the wheels
# travel with the work tree. Versions match .venv (pydantic-core is compiled, so the target Python matters).
#   usage: bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12, the GPU machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${1:-3.12}"
WHEELS=(
  diffusers==0.42.1
  pydantic==2.14.3
  pydantic-core==2.50.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic 2.14 needs >= 4.16; an older system copy would shadow nothing else
  pyyaml==6.0.3              # engine/config.py imports yaml
  psutil==7.2.2              # benchmarks/record.py reads memory with it
)
mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$wheel"
done
du -sh .whl
