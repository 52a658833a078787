#!/usr/bin/env bash
# Session 12's planned next device call (superseded: session 13 ran issue6_flash*.sh instead;
# `NCU=1 bash xtask/device/issue6_flash3.sh` is the fullest current call), in order of
# importance, for one call of at most 600 s. Every measurement is gpu_bench.sh's; this only
# picks the settings and tags the runs, so that a call cut short still brings back the first
# figures. Build first (`cargo xtask device-bundle`), then, with the device tool and carry
# [".device"]:
#
#   bash xtask/device/issue6_next.sh
#
# What each part answers (the defaults: `--kernels auto`, `--gemm cublaslt`):
#  1. check_bf16 with the final rule of check-fast-path (the f32 comparison's floor, never run
#     on the GPU in session 12), with the per-parameter figures in the report;
#  2. ours_b8_bf16 and peer_amp_b8, same call: tokens/s and peak memory against the targets;
#  3. one profiled step (CUBECL_PROFILE=basic), summarised by profile_summary.py;
#  4. the 1.5b preset at batch 4 and its peer;
#  5. the 50-step loss curve of the fast path against the reference path (issue 6's 1% rule).
# Results: $OUT/results.tar.xz (the device returns at most 8 files), packed also when the call
# is cut short (trap), and the profile summary beside it; the CubeCL cache is not packed.
source xtask/device/call.sh issue6
export STEPS=${STEPS:-8}
{
  bash $G check_bf16 ours_b8_bf16 peer_amp_b8
  env CUBECL_PROFILE=basic STEPS=2 TAG=profile bash $G ours_b8_bf16
  python3 xtask/device/profile_summary.py "$OUT/ours_b8_bf16_profile.log" 40 > "$O/profile_b8.md"
  bash $G ours_1p5b_b4 peer_amp_1p5b_b4
  bash $G curve_fast_b4 curve_ref_b4
  python3 xtask/peer/compare_curves.py "$OUT/curve_fast_b4.json" "$OUT/curve_ref_b4.json" > "$OUT/curve_compare.json"
} > "$OUT/run.log" 2>&1
cat "$O/profile_b8.md" "$OUT/curve_compare.json"
summary tokens_per_second step_seconds_mean queued_seconds_mean peak_delta_gib pass logits_rel grad_rel_max max_relative_diff
