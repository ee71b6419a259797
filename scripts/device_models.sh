#!/usr/bin/env bash
# On the lent GPU (device tool): HF-transformers compatibility of exported checkpoints, then
# forward+backward throughput of the three variants with burn-cuda. Expects the release
# xtask built with `--features cuda` and the exports in .device/ (carried).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export XDG_CACHE_HOME=${OUT:-/tmp}/cache
[ -x .device/xtask ] || python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.device/xtask.xz'),open('.device/xtask','wb'))" && chmod +x .device/xtask
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
date -u
python3 scripts/hf_check.py .device/export 2>&1 | grep -v Warning | tee ${OUT:-/tmp}/hf_check.txt
for batch in ${BATCHES:-16}; do
  timeout ${BENCH_TIMEOUT:-480} ./.device/xtask bench models --backend cuda --dtype ${DTYPE:-bf16} --batch $batch --steps ${STEPS:-5} 2>&1 | tee -a ${OUT:-/tmp}/bench_models.txt
done
