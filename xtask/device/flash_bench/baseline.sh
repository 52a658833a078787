#!/usr/bin/env bash
# Writes baseline_flash.cu (git-ignored): the fused attention's kernels as of REV (default
# c28e860, session 17's), renamed qfbase_*, for run.sh to time against the current ones in one
# process. Run it here before the device call, and pass the file in the device tool's carry:
#   bash xtask/device/flash_bench/baseline.sh [REV]   # carry ["xtask/device/flash_bench/baseline_flash.cu"]
set -eu
cd "$(dirname "$0")"
git show "${1:-c28e860}:crates/model/src/attention/flash/flash.cu" |
  sed -E 's/QF_KERNEL qf_(forward|backward|delta)_/QF_KERNEL qfbase_\1_/' > baseline_flash.cu
