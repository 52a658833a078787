#!/usr/bin/env bash
# Issue 6, session 13, second device call (after issue6_flash.sh): the fused attention's check
# with both passes counted and its timing against PyTorch's SDPA, the 50-step loss curve of the
# fast path against the reference path, one profiled step, and 0.5b batch 8 with its peer
# again. Build first (`cargo xtask device-bundle`), then with carry [".device"]:
#
#   bash xtask/device/issue6_flash2.sh
source xtask/device/call.sh issue6
export STEPS=${STEPS:-8}
{
  bash $G check_attn_64 peer_attn_64 check_attn_128 peer_attn_128
  bash $G ours_b8_bf16 peer_amp_b8
  bash $G curve_fast_b4 curve_ref_b4
  python3 xtask/peer/compare_curves.py "$OUT/curve_fast_b4.json" "$OUT/curve_ref_b4.json" > "$OUT/curve_compare.json"
  env CUBECL_PROFILE=basic STEPS=2 TAG=profile bash $G ours_b8_bf16
  python3 xtask/device/profile_summary.py "$OUT/ours_b8_bf16_profile.log" 40 > "$O/profile_b8.md"
} > "$OUT/run.log" 2>&1
cat "$O/profile_b8.md" "$OUT/curve_compare.json"
summary tokens_per_second step_seconds_mean peak_delta_gib fused_attention_passes_per_step pass fused_passes fused_vs_chunked fused_vs_f32 chunked_vs_f32 fused_seconds chunked_seconds seconds max_relative_diff
run_errors
