#!/usr/bin/env bash
# Builds the bench (four translation units in parallel) and runs it. Here first, for the old
# kernels (git-ignored, so pass it in the device tool's carry):
#   bash xtask/device/flash_bench/baseline.sh   # carry ["xtask/device/flash_bench/baseline_flash.cu"]
# then on the device machine:
#   bash xtask/device/flash_bench/run.sh
# ptxas's register and spill figures go to $OUT/ptxas.txt (and the summary lines to stdout).
set -u
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/flash_bench_out}
mkdir -p "$OUT" /tmp/fb
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
FLAGS="-O3 -arch=sm_90a -std=c++17 -Xptxas -v"
pids=()
for tu in kernels_base kernels_fwd kernels_bwd64 kernels_bwd128; do
  ($NVCC $FLAGS -c $tu.cu -o /tmp/fb/$tu.o > /tmp/fb/$tu.log 2>&1 || echo "BUILD FAILED: $tu") &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
cat /tmp/fb/kernels_*.log > "$OUT/ptxas.txt"
grep -E "error" /tmp/fb/*.log | head -40
# One line per kernel: name, registers, spills.
python3 - "$OUT/ptxas.txt" <<'PY'
import re, sys
name = None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m: name = m.group(1); spill = ''
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m: spill = f"spill st {m.group(1)} ld {m.group(2)}"
    m = re.search(r"Used (\d+) registers", line)
    if m and name and not re.search(r"tu_qf_delta|tu_qf_forward_.*b..tu|b64tu_qf_backward_128|b128tu_qf_backward_64|(b64|b128)tu_qf_forward|fwdtu_qf_backward", name): print(f"{name:28s} regs {m.group(1):>4s} {spill}")
PY
SRC=../../../crates/model/src/attention/flash/flash.cu
def() { sed -n "s/^#define $1 \([0-9]*\)$/\1/p" $SRC; }
PROD="-DPROD_FWD_WARPS=$(def QF_FORWARD_WARPS) -DPROD_BWD_WARPS=$(def QF_BACKWARD_WARPS) -DPROD_BWD_ROWS=$(def QF_BACKWARD_ROWS)"
echo "production: $PROD"
$NVCC -O3 -arch=sm_90a -std=c++17 $PROD main.cu /tmp/fb/*.o -o /tmp/fb/bench || { echo "LINK FAILED"; exit 1; }
/tmp/fb/bench "${ITERS:-20}" 2>&1 | tee "$OUT/bench.txt"
