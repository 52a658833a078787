#!/usr/bin/env bash
# Issue 6, session 13, eighth device call: the backward's dS^T stored in pairs and the vector
# reductions. As issue6_flash4.sh without ncu: the attention alone against PyTorch's SDPA (same
# call), 0.5b batch 8 and 1.5b batch 4 against their peers, the fast path's 50-step curve
# (against call 2's reference curve). Build first (`cargo xtask device-bundle`), then with
# carry [".device"]:
#
#   bash xtask/device/issue6_flash5.sh
source xtask/device/call.sh issue6
export STEPS=${STEPS:-8} ATTN_ITERS=${ATTN_ITERS:-30}
{
  bash $G check_attn_128 peer_attn_128 check_attn_64 peer_attn_64
  bash $G ours_b8_bf16 peer_amp_b8
  bash $G ours_1p5b_b4 peer_amp_1p5b_b4
  bash $G curve_fast_b4
} > "$OUT/run.log" 2>&1
summary tokens_per_second peak_delta_gib fused_attention_passes_per_step pass fused_passes fused_vs_f32 chunked_vs_f32 fused_seconds chunked_seconds seconds
run_errors
