#!/usr/bin/env bash
# Issue 6, sessions 14 and 15: the attention alone against PyTorch's SDPA (same call), 0.5b
# batch 8 and 1.5b batch 4 against their peers, then both 0.5b steps under Nsight Compute (each
# kernel's GPU time, ours and the peer's, one step taken apart by xtask/peer/step_breakdown.py;
# BREAKDOWN=0 leaves them out, PEER_BREAKDOWN= the peer's). ATTN=0 leaves out the attention
# checks; CHECK=1 adds check_bf16 (fast path against reference on the fixture model). NCU=1 adds ncu's figures of the fused kernels at
# head size 64; CURVE=1 the fast path's 50-step curve (compared here with session 13's call 2
# reference, whose path has not changed); LARGE=0 leaves out 1.5b; CACHED=1 adds both presets
# again with cached cuBLASLt plans (`--gemm cublaslt-cached`, results tagged `_cached`), which
# spend less host time per product (added in session 15). PROFILE=1 adds 0.5b batch 8 again
# with samples of the host's time (session 16; needs a `cuda,host-profile` build:
# BINARY=qwen-sft-cuda-host-profile). Build first (`cargo xtask device-bundle`), then with carry
# [".device"]:
#
#   bash xtask/device/issue6_s14.sh
source xtask/device/call.sh issue6
export STEPS=${STEPS:-8} ATTN_ITERS=${ATTN_ITERS:-30}
{
  [ "${ATTN:-1}" = 1 ] && bash $G check_attn_64 peer_attn_64 check_attn_128 peer_attn_128
  [ "${CHECK:-0}" = 1 ] && bash $G check_bf16
  bash $G ours_b8_bf16 peer_amp_b8
  [ "${LARGE:-1}" = 1 ] && bash $G ours_1p5b_b4 peer_amp_1p5b_b4
  if [ "${CACHED:-0}" = 1 ]; then
    TAG=cached GEMM=cublaslt-cached bash $G ours_b8_bf16
    [ "${LARGE:-1}" = 1 ] && TAG=cached GEMM=cublaslt-cached bash $G ours_1p5b_b4
  fi
  [ "${PROFILE:-0}" = 1 ] && bash $G profile_b8
  [ "${CURVE:-0}" = 1 ] && bash $G curve_fast_b4
  [ "${BREAKDOWN:-1}" = 1 ] && bash $G ncu_b8 ${PEER_BREAKDOWN:-ncu_peer_b8}
  if [ "${NCU:-0}" = 1 ]; then
    /usr/local/cuda/bin/ncu --kernel-name regex:qf_ --launch-count 3 --section SpeedOfLight \
      --section Occupancy --section WarpStateStats --section LaunchStats --section InstructionStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis \
      /tmp/qwen-sft check-attention --heads 14 --kv-heads 2 --head-dim 64 --seq-len 2048 \
      --batch-size 8 > "$OUT/ncu_d64.txt" 2>&1
  fi
} > "$OUT/run.log" 2>&1
[ "${NCU:-0}" = 1 ] && grep -E "^  qf_|Duration|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" "$OUT"/ncu_d64.txt
for f in "$OUT"/ncu_*b8.json; do
  [ -f "$f" ] && python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[1], d['step_kernels'], d['step_gpu_ms'], {k: v['ms'] for k, v in d['kinds'].items()})" "$f"
done
summary tokens_per_second peak_delta_gib fused_attention_passes_per_step pass fused_passes fused_vs_f32 chunked_vs_f32 fused_seconds chunked_seconds seconds first_loss last_loss
run_errors
