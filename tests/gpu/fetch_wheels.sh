#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into tests/gpu/wheels/ (git-ignored), on a machine with
# network. That machine (Python 3.12, torch 2.11, transformers 5.17, triton 3.6, no network) has
# no DeepSpeed (and none of its pydantic / hjson needs) and a PEFT of unknown version; the wheels
# pin the versions this project was tested with. flash-attn is not carried: it has no wheel on
# PyPI for torch 2.11 / CUDA 13 and is far over the 64 MiB a device call may carry, so the
# flash-attention tests skip there.
#
#   bash tests/gpu/fetch_wheels.sh          # ~6 MB
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
PY=${PYTHON:-python3}
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Pure-Python wheels.
"$PY" -m pip download -q --no-deps -d wheels peft==0.21.2 hjson==3.1.0 pydantic==2.11.7 \
    annotated-types==0.7.0 typing-inspection==0.4.1 typing-extensions==4.15.0
# pydantic's compiled core, for CPython 3.12.
"$PY" -m pip download -q --no-deps "${platform[@]}" -d wheels pydantic-core==2.33.2
# DeepSpeed publishes only a source archive; its wheel is pure Python (ops compile on first use).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w wheels deepspeed==0.19.8
ls -l wheels
