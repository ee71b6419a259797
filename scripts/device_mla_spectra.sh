#!/usr/bin/env bash
# On the lent GPU (device tool): a scaled `reproduce mla-spectra` of all three variants at the
# paper preset on the make-corpus data, then copies the report, figures, configuration and
# compressed metrics into $OUT. Expects .device/xtask.xz (release, --features cuda) and
# .device/corpus (python3 ../shared/data/make-corpus.py .device/corpus), both carried.
#   STEPS (default 800), BATCH (64)
# At 800 steps the three variants take ~16 minutes, past the device's 10-minute limit per
# command: start it in the background and poll from later commands (within the machine's
# 30-minute hold), e.g.
#   (setsid nohup env STEPS=800 OUT=/tmp/mlaout bash scripts/device_mla_spectra.sh > /tmp/mla.log 2>&1 < /dev/null &)
# then `cp -r /tmp/mlaout/* $OUT/` once `xtask reproduce` has exited.
set -uo pipefail
# The device lacks fontconfig/freetype (plotters' text): .device/lib and .device/fonts carry
# this machine's copies and the DejaVu fonts.
export LD_LIBRARY_PATH=$PWD/.device/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export FONTCONFIG_FILE=$PWD/.device/fonts/fonts.conf
[ -x .device/xtask ] || python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.device/xtask.xz'),open('.device/xtask','wb'))" && chmod +x .device/xtask
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
date -u
RUN=/tmp/mla-spectra-gpu
rm -rf $RUN
/usr/bin/time -v ./.device/xtask reproduce mla-spectra --preset paper --backend cuda \
  --data .device/corpus --steps ${STEPS:-800} --batch ${BATCH:-64} --accumulation 1 \
  --out $RUN --quiet 2>&1 | grep -v '^\s*\(Page\|Minor\|Major\|Vol\|Invol\|Swaps\|File\|Socket\|Signals\|Average\|Exit\|Percent\|System\|User\)' | tee ${OUT:-/tmp}/run.log
mkdir -p ${OUT:-/tmp}/run
cp -r $RUN/report.md $RUN/report.html $RUN/config.json $RUN/summary.json $RUN/figures ${OUT:-/tmp}/run/ 2>/dev/null
for v in mha mla-prerope mla-decoupled; do
  [ -f $RUN/$v/metrics.csv ] && gzip -c $RUN/$v/metrics.csv > ${OUT:-/tmp}/run/metrics-$v.csv.gz
done
ls -la ${OUT:-/tmp}/run
