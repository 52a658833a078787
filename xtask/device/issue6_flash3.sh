#!/usr/bin/env bash
# Issue 6, session 13, device calls 5, 7 and 8 (each with the binary of its commit; BENCHMARKS
# says which change each call measured): the attention alone against PyTorch's SDPA (same
# call), 0.5b batch 8 and 1.5b batch 4 against their peers, and the fast path's 50-step curve
# (compared with call 2's reference curve, whose path did not change). With NCU=1 (call 7),
# also ncu's figures of the three fused kernels at both head sizes. Build first (`cargo xtask
# device-bundle`), then with carry [".device"]:
#
#   bash xtask/device/issue6_flash3.sh          # NCU=1 bash ... for the kernels under ncu
source xtask/device/call.sh issue6
export STEPS=${STEPS:-8} ATTN_ITERS=${ATTN_ITERS:-30}
{
  bash $G check_attn_128 peer_attn_128 check_attn_64 peer_attn_64
  bash $G ours_b8_bf16 peer_amp_b8
  bash $G ours_1p5b_b4 peer_amp_1p5b_b4
  bash $G curve_fast_b4
  # ncu: each fused kernel once per head size (check-attention without timing runs each once).
  if [ "${NCU:-0}" = 1 ]; then
    for cfg in "64 14 8" "128 12 4"; do
      set -- $cfg
      /usr/local/cuda/bin/ncu --kernel-name regex:qf_ --launch-count 3 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section LaunchStats \
        /tmp/qwen-sft check-attention --heads $2 --kv-heads 2 --head-dim $1 --seq-len 2048 \
        --batch-size $3 > "$OUT/ncu_d$1.txt" 2>&1
    done
  fi
} > "$OUT/run.log" 2>&1
[ "${NCU:-0}" = 1 ] && grep -E "^  qf_|Duration|Compute \(SM\) Throughput|Achieved Occupancy" "$OUT"/ncu_d*.txt
summary tokens_per_second peak_delta_gib fused_attention_passes_per_step pass fused_passes fused_vs_f32 chunked_vs_f32 fused_seconds chunked_seconds seconds first_loss last_loss
run_errors
