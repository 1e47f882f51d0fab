#!/bin/bash
# One device call, after `bash .devpack/install.sh` has unpacked p1 (see ../shared/device/README.md):
#   carry [".devpack/p2", ".devpack/install.sh"], command:
#   bash benchmarks/device_run.sh --model llama3-8b --n-gpus 2 --lengths 4096,8192,16384,32768,65536 --budget-s 520
# Arguments go to benchmarks/ttft.py (or to gpu_correctness.py when the first one is `correctness`);
# results and logs go to $OUT (the device's returned folder; ./bench_out when run elsewhere).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 \
  RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if command -v nvidia-smi > /dev/null; then   # on a CPU machine keep its own vLLM (a smoke run of this script)
  # Idempotent: unpacks whatever parts (p2, p3) travelled with this call; p1 must already be in /tmp/site.
  [ -f .devpack/install.sh ] && bash .devpack/install.sh 2>&1 | tee -a "$OUT/install.log"
  export PYTHONPATH=/tmp/site:$PWD
  # Record what the numbers were measured on (GPU model, links) next to them.
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } > "$OUT/gpus.txt" 2>&1
fi
SCRIPT=benchmarks.ttft
[ "${1:-}" = correctness ] && { SCRIPT=benchmarks.gpu_correctness; shift; }
python3 -m $SCRIPT --out "$OUT" "$@" 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
# The markdown part of the report needs no matplotlib; the PNG is skipped when it is missing.
[ $SCRIPT = benchmarks.ttft ] && python3 -m benchmarks.report "$OUT" > /dev/null 2>&1 && tail -n 40 "$OUT/ttft.md"
exit $rc
