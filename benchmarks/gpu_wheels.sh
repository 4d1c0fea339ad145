#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks into DIR (default .whl, ignored by git) for run_gpu_checks.sh:
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # then carry DIR in the device `run` call
#
# That machine (Python 3.12, x86-64, no registry access) has torch 2.11, Triton 3.6, transformers 5.17,
# tokenizers 0.23.2, huggingface-hub 1.33, accelerate 1.15.0, safetensors 0.8.0, numpy, pyyaml, pillow, httpx,
# pytest, but no diffusers and no modelopt. The benchmark runs the stack CI tests: the project's pins (diffusers
# 0.39.0, transformers 4.57.6, which needs tokenizers < 0.23.1 and huggingface-hub < 1.0; peft 0.21.2), plus
# nvidia-modelopt 0.47.0 for the fp8 / int8 rows with the imports it needs that the machine lacks. Installed with
# --no-deps into /tmp/site ahead of the machine's own packages. About 26 MB (the carried tree's limit is 64 MiB).
set -eu
DIR=${1:-.whl}
mkdir -p "$DIR"
PIP=${PIP:-python3 -m pip}
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
$PIP download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DIR" \
  diffusers==0.39.0 transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2 peft==0.21.2 \
  nvidia-modelopt==0.47.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  typing-extensions omegaconf==2.3.0 pulp==3.3.2
# omegaconf's parser runtime is published as a source archive only: build its (pure-Python) wheel here
$PIP wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3
ls -la "$DIR"
du -sh "$DIR"
