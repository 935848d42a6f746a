# kdpipe on CPU (default). For CUDA, build from a CUDA runtime image and install a CUDA torch:
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t kdpipe:cuda .
# (the CUDA base image needs python3 and python3-venv; see the README, "GPU").
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false KDPIPE_HOME=/data/kdpipe-home
WORKDIR /opt/kdpipe
# torch first, from the chosen index, so the package's plain `torch` requirement is already met.
RUN python3 -m pip install --index-url ${TORCH_INDEX} torch
COPY pyproject.toml README.md ./
COPY kdpipe kdpipe
COPY pipeline pipeline
COPY stages stages
COPY schemas schemas
RUN python3 -m pip install '.[s3]'
WORKDIR /data
ENTRYPOINT ["kdpipe"]
CMD ["--help"]
