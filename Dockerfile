# The synthray image for Ray clusters (k8s/*.yaml): the Ray image of the pinned Ray version with the project
# and its dependencies installed, so `python -m jobs.generate` / `python -m jobs.train` run on every pod.
#   docker build -t <registry>/synthray:0.1.0 . && docker push <registry>/synthray:0.1.0
# RAY_VERSION must match pyproject.toml's ray pin (tests/test_k8s_manifests.py checks it and rayVersion).
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

# The code lives here; the manifests name configs by this path (/home/ray/synthray/configs/...).
USER root
RUN mkdir -p /home/ray/synthray && chown ray:users /home/ray/synthray
USER ray
WORKDIR /home/ray/synthray

# Dependencies first (a layer that changes only with requirements-gpu.txt): the GPU stack with CUDA vLLM,
# whose exact torch pin the image follows (see requirements-gpu.txt); then the code, without dependencies.
COPY --chown=ray:users requirements-gpu.txt ./
RUN pip install --no-cache-dir -r requirements-gpu.txt
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users engine engine
COPY --chown=ray:users actors actors
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users configs configs
RUN pip install --no-cache-dir --no-deps -e .

# Model downloads go to the shared cache volume the manifests mount at /models; never into the image.
ENV HF_HOME=/models/huggingface \
    PYTHONUNBUFFERED=1
