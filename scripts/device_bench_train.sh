#!/usr/bin/env bash
# On the lent GPU (device tool): `bench train` (burn vs the PyTorch reference, same weights and
# batches) and, optionally, `bench probe`. Expects .device/xtask.xz (release, --features cuda),
# and .device/lib (this machine's libfontconfig.so.1, libfreetype.so.6, libexpat.so.1,
# libpng16.so.16, libbrotlidec.so.1, libbrotlicommon.so.1: the device lacks them), carried.
# Results (stdout tables, every result.json) go to $OUT.
#   CPU_STEPS (default 0: skip the CPU f32 numerics check; else its updates, tiny preset)
#   GPU_VARIANTS (default mha,mla-prerope,mla-decoupled), GPU_STEPS (100), GPU_REFERENCE
#   (eager,sdpa,compile), MATMUL (cublas, cublas-composed or cubecl, or several separated by
#   commas, each a `bench train` run; default cublas; the reference runs with the first only),
#   BUILDS (default xtask: .device/xtask.xz; several names separated by commas run the same
#   benchmarks with each carried .device/NAME.xz, the reference with the first only),
#   BENCH_ARGS (extra arguments of every burn `bench train` run, e.g. `--read-every 1`, or
#   `--phases` to see whether the host or the GPU bounds an update; the
#   builds must all know them), ARGS_<NAME> (extra arguments of build NAME's runs only, e.g.
#   ARGS_one="--read-every 1" with a copy of xtask.xz carried as one.xz), PROBE_STEPS (default
#   0: skip `bench probe`). Every .device/NAME-test.xz carried (the
#   ignored GPU tests of crates/experiments/tests/NAME.rs, built with `cargo test --release
#   -p experiments --features cuda --test NAME --no-run`) runs first.
set -uo pipefail
export LD_LIBRARY_PATH=$PWD/.device/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
unxz_bin() { # .device/NAME.xz → .device/NAME, executable
  [ -x ".device/$1" ] || { python3 -c "import lzma,shutil,sys;shutil.copyfileobj(lzma.open(sys.argv[1]+'.xz'),open(sys.argv[1],'wb'))" ".device/$1" && chmod +x ".device/$1"; }
}
unxz_bin xtask
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
date -u
for xz in .device/*-test.xz; do
  [ -f "$xz" ] || continue
  bin=${xz%.xz}
  unxz_bin "$(basename "$bin")"
  "./$bin" --ignored --test-threads 1 2>&1 | tee "$OUT/$(basename "$bin").log"
done
if [ "${CPU_STEPS:-0}" -gt 0 ]; then
  ./.device/xtask bench train --backend cpu --preset tiny --steps "$CPU_STEPS" \
    --reference eager,sdpa --skip 3 --out /tmp/bench-train-cpu 2>&1 | tee "$OUT/bench-train-cpu.log"
  for f in /tmp/bench-train-cpu/*/result.json; do
    cp "$f" "$OUT/cpu-$(basename "$(dirname "$f")").json"
  done
fi
if [ -n "${GPU_VARIANTS-mha,mla-prerope,mla-decoupled}" ]; then
  reference=${GPU_REFERENCE:-eager,sdpa,compile}
  round=0
  for build in $(echo "${BUILDS:-xtask}" | tr , ' '); do
    unxz_bin "$build"
    own_args="ARGS_${build//-/_}"
    round=$((round + 1))
    for matmul in $(echo "${MATMUL:-cublas}" | tr , ' '); do
      run="$round-$build-$matmul"
      ./.device/"$build" bench train --backend cuda --matmul "$matmul" --preset paper \
        --variants "${GPU_VARIANTS-mha,mla-prerope,mla-decoupled}" --steps "${GPU_STEPS:-100}" \
        --reference "$reference" --out "/tmp/bench-train-gpu-$run" ${BENCH_ARGS:-} ${!own_args:-} 2>&1 \
        | tee "$OUT/bench-train-gpu-$run.log"
      for f in /tmp/bench-train-gpu-"$run"/*/result.json; do
        [ -f "$f" ] && cp "$f" "$OUT/gpu-$run-$(basename "$(dirname "$f")").json"
      done
      reference=none
    done
  done
fi
if [ "${PROBE_STEPS:-0}" -gt 0 ]; then
  ./.device/xtask bench probe --backend cuda --preset paper --variant mla-decoupled \
    --steps "$PROBE_STEPS" --batch 64 2>&1 | tee "$OUT/bench-probe-gpu.log"
fi
date -u
# Kernel-level profile (ncu, kernel durations only): NCU_VARIANT set → a 4-update burn run and
# a 4-update PyTorch SDPA run of that variant, summarised by kernel name. NCU_WINDOW=SKIP,COUNT
# instead profiles only launches SKIP+1 … SKIP+COUNT of a 6-update burn run (one update in
# steady state, e.g. 7000,2400 for MLA: ~2 300 launches an update), no PyTorch run.
if [ -n "${NCU_VARIANT:-}" ]; then
  NCU="ncu --clock-control none --metrics gpu__time_duration.sum --csv --target-processes all"
  if [ -n "${NCU_WINDOW:-}" ]; then
    $NCU --launch-skip "${NCU_WINDOW%,*}" --launch-count "${NCU_WINDOW#*,}" \
      --log-file "$OUT/ncu-burn.csv" ./.device/xtask bench train --backend cuda \
      --matmul "${MATMUL:-cublas}" --preset paper --variants "$NCU_VARIANT" --steps 6 --skip 2 \
      --reference none --out /tmp/ncu-run > "$OUT/ncu-burn.log" 2>&1
    sides=burn
  else
    $NCU --log-file "$OUT/ncu-burn.csv" ./.device/xtask bench train --backend cuda \
      --matmul "${MATMUL:-cublas}" --preset paper \
      --variants "$NCU_VARIANT" --steps 4 --skip 1 --reference none --out /tmp/ncu-run > "$OUT/ncu-burn.log" 2>&1
    $NCU --log-file "$OUT/ncu-torch.csv" python3 benches/reference/train.py --run "/tmp/ncu-run/$NCU_VARIANT" \
      --impl sdpa --steps 4 > "$OUT/ncu-torch.log" 2>&1
    sides="burn torch"
  fi
  for k in $sides; do
    echo "## ncu $k $NCU_VARIANT (${NCU_WINDOW:+launches $NCU_WINDOW of }the run)"
    python3 scripts/ncu_summary.py "$OUT/ncu-$k.csv" 30
  done 2>&1 | tee "$OUT/ncu-summary.txt"
  for k in $sides; do gzip -f "$OUT/ncu-$k.csv"; done
fi
# Kernel time by name with Nsight Systems (a trace, no kernel replay: cheap where ncu is not):
# NSYS_VARIANT set → a 6-update burn run of that variant under `nsys profile -t cuda`, and the
# per-kernel summary as CSV.
if [ -n "${NSYS_VARIANT:-}" ]; then
  NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
  if [ -z "$NSYS" ]; then
    echo "nsys not found" | tee "$OUT/nsys-burn.log"
  else
    "$NSYS" profile -t cuda --force-overwrite true -o /tmp/nsys-burn ./.device/xtask bench train \
      --backend cuda --matmul "${MATMUL:-cublas}" --preset paper --variants "$NSYS_VARIANT" \
      --steps 6 --skip 2 --reference none --out /tmp/nsys-run > "$OUT/nsys-burn.log" 2>&1
    "$NSYS" stats -r cuda_gpu_kern_sum -f csv -o "$OUT/nsys-burn" /tmp/nsys-burn.nsys-rep \
      >> "$OUT/nsys-burn.log" 2>&1
  fi
fi
date -u
# The device returns at most 8 files: everything goes back in one archive, the logs beside it.
(cd "$OUT" && tar czf /tmp/results.tgz --exclude results.tgz . && mv /tmp/results.tgz results.tgz \
  && find . -type f ! -name results.tgz ! -name '*.log' -delete)
