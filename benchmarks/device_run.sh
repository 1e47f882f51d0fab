#!/bin/bash
# One device call, after `bash .devpack/install.sh` has unpacked p1 (see ../shared/device/README.md):
#   carry [".devpack/p2", ".devpack/install.sh"], command:
#   bash benchmarks/device_run.sh --model llama3-8b --n-gpus 2 --lengths 4096,8192,16384,32768,65536 --budget-s 520
# Arguments go to benchmarks/ttft.py (or to gpu_correctness.py when the first one is `correctness`, to
# serving.py when it is `serving`: bash benchmarks/device_run.sh serving --n-gpus 2 --configs 1gpu,tp,kvr --budget-s 500;
# to serve_bench.py when it is `serve`, `vllm serve` + `vllm bench serve|latency`, which needs p4 (pack.sh --with-serve):
#   carry [".devpack/p2", ".devpack/p4", ".devpack/install.sh"],
#   bash benchmarks/device_run.sh serve --configs kvr --n-gpus 2 --budget-s 500);
# results and logs go to $OUT (the device's returned folder; ./bench_out when run elsewhere).
# Several runs in one call: give each its own OUT (OUT=$OUT/a bash benchmarks/device_run.sh ...).
# KVR_TIMEOUT_S (default 560): the Python run is stopped (SIGTERM; its parent kills the running engine's
# process group) this many seconds after this script started, so the logs still get packed below.
# The device returns at most 8 files, so per-config logs, gpus.txt and install.log go into logs.tgz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 \
  RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if command -v nvidia-smi > /dev/null; then   # on a CPU machine keep its own vLLM (a smoke run of this script)
  # Idempotent: unpacks whatever parts (p2, p3) travelled with this call; p1 must already be in /tmp/site.
  [ -f .devpack/install.sh ] && bash .devpack/install.sh 2>&1 | tee -a "$OUT/install.log"
  export PYTHONPATH=/tmp/site:$PWD
  # vLLM finds general plugins through entry points only; the package is imported from $PWD
  python3 -m benchmarks.entry_point /tmp/site 2>&1 | tee -a "$OUT/install.log"
  # Record what the numbers were measured on (GPU model, links) next to them.
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } > "$OUT/gpus.txt" 2>&1
  head -n 3 "$OUT/gpus.txt"
fi
SCRIPT=benchmarks.ttft
[ "${1:-}" = correctness ] && { SCRIPT=benchmarks.gpu_correctness; shift; }
[ "${1:-}" = serving ] && { SCRIPT=benchmarks.serving; shift; }
[ "${1:-}" = serve ] && { SCRIPT=benchmarks.serve_bench; shift; }
T=$(( ${KVR_TIMEOUT_S:-560} - SECONDS ))
timeout -k 20 $T python3 -m $SCRIPT --out "$OUT" "$@" 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
[ $rc = 124 ] && echo "device_run: stopped after ${T}s (KVR_TIMEOUT_S)" | tee -a "$OUT/run.log"
command -v nvidia-smi > /dev/null && { echo "GPU processes left:"; nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; } | tee -a "$OUT/run.log"
# The markdown part of the report needs no matplotlib; the PNG is made where the results are collected.
[ $SCRIPT = benchmarks.ttft ] && python3 -m benchmarks.report "$OUT" > /dev/null 2>&1 && rm -f "$OUT/ttft.png" && tail -n 40 "$OUT/ttft.md"
# serving.png only where matplotlib is installed (the report skips it otherwise).
[ $SCRIPT = benchmarks.serving ] && [ -f "$OUT/serving.json" ] && python3 -m benchmarks.serving_report "$OUT" > /dev/null 2>&1 && tail -n 60 "$OUT/serving.md"
[ $SCRIPT = benchmarks.serve_bench ] && [ -f "$OUT/serve_gpu.json" ] && python3 -m benchmarks.serve_report "$OUT" > /dev/null 2>&1 && tail -n 60 "$OUT/serve_gpu.md"
( cd "$OUT" && tar -czf logs.tgz --remove-files $(ls -d logs gpus.txt install.log 2>/dev/null) )
exit $rc
