#!/usr/bin/env bash
# Issue 6, session 13: the first device call with the fused attention (attention/flash), for
# one call of at most 600 s, most important first. Build first (`cargo xtask device-bundle`),
# then, with the device tool and carry [".device"]:
#
#   bash xtask/device/issue6_flash.sh
#
#  1. check-attention at 0.5b's (d 64, 14/2 heads) and 1.5b's (d 128, 12/2 heads) sizes, seq
#     2048: the fused kernels against the chunked attention and f32, output and gradients;
#  2. 0.5b batch 8 with the fused attention, and the peer, same call;
#  3. the same run with `--kernels-off flash` (the chunked attention of session 12), same call;
#  4. check-fast-path in bf16 (the fixture model, head size 4: the chunked path);
#  5. the 1.5b preset at batch 4 and its peer.
# Results: $OUT/results.tar.xz (the device returns at most 8 files), packed also when the call
# is cut short.
source xtask/device/call.sh issue6
export STEPS=${STEPS:-8}
{
  bash $G check_attn_64 check_attn_128
  bash $G ours_b8_bf16 peer_amp_b8
  env KERNELS_OFF=flash TAG=chunked bash $G ours_b8_bf16
  bash $G check_bf16
  bash $G ours_1p5b_b4 peer_amp_1p5b_b4
} > "$OUT/run.log" 2>&1
summary tokens_per_second step_seconds_mean peak_delta_gib fused_attention_passes_per_step pass fused_passes fused_vs_chunked fused_vs_f32 chunked_vs_f32 logits_rel grad_rel_max first_loss last_loss
run_errors
