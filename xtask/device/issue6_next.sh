#!/usr/bin/env bash
# Issue 6's open measurements (docs/ARCHITECTURE.md, "GPU speed", "What is next"), in order of
# importance, for one device call of at most 600 s. Every measurement is gpu_bench.sh's; this only
# picks the settings and tags the runs, so that a call cut short still brings back the first
# figures. Build first (`cargo xtask device-bundle`), then, with the device tool and carry
# [".device"]:
#
#   bash xtask/device/issue6_next.sh
#
# What each part answers:
#  1. check_bf16_new: the model's kernels (block softmax, RoPE, RMSNorm: `--kernels auto`) and the
#     cached cuBLASLt plans (`--gemm cublaslt-cached`) against the reference path, logits and
#     gradients, on the GPU (neither has run on CUDA yet);
#  2. ours_b8_bf16_new, ours_b8_bf16 (the current defaults) and peer_amp_b8, same call: tokens/s,
#     peak memory against the 30 GiB target, and `queued_seconds_mean` against
#     `step_seconds_mean` (close together: the host, not the GPU, sets the pace);
#  3. one setting changed at a time: the kernels with the uncached products, and the cached
#     products with the tensor-op bodies;
#  4. the attention chunk budget with the kernels (their bf16 tiles take half of what the plan
#     assumes): 2 and 4 GiB;
#  5. where nsys is installed, a timeline of three steps with the new settings, summarised by
#     nsys (kernel times, CUDA API times): whether the GPU waits for the host between kernels.
#  6. one profiled step with the new settings (CUBECL_PROFILE=basic: every kernel timed, one sync
#     each): the per-op breakdown, summarised with profile_summary.py.
# Results: $OUT/results.tar.xz (the device returns at most 8 files), packed also when the call
# is cut short (trap); the CubeCL cache is not packed (SAVE_CACHE=0).
set -u
O=${OUT:-/tmp/issue6}
export OUT=/tmp/issue6-results SAVE_CACHE=0 STEPS=${STEPS:-8}
mkdir -p "$OUT" "$O"
trap 'tar -cJf "$O/results.tar.xz" -C "$OUT" .' EXIT
G=xtask/device/gpu_bench.sh
NEW="GEMM=cublaslt-cached KERNELS=auto"
{
  env $NEW TAG=new bash $G check_bf16 ours_b8_bf16
  bash $G ours_b8_bf16 peer_amp_b8
  env GEMM=cublaslt KERNELS=auto TAG=kernels bash $G ours_b8_bf16
  env GEMM=cublaslt-cached KERNELS=tensor-ops TAG=cached bash $G ours_b8_bf16
  env $NEW ATTN_MIB=2048 TAG=new_2g bash $G ours_b8_bf16
  env $NEW ATTN_MIB=4096 TAG=new_4g bash $G ours_b8_bf16
  if command -v nsys >/dev/null; then
    # gpu_bench.sh left the unpacked binary in /tmp and its cubecl.toml here.
    timeout 240 nsys profile -t cuda,nvtx --stats=true --force-overwrite true -o /tmp/nsys_b8 \
      /tmp/qwen-sft --gemm cublaslt-cached --kernels auto bench --preset 0.5b \
      --seq-len 2048 --batch-size 8 --steps 3 --warmup-steps 2 --precision bf16 \
      > "$OUT/nsys_b8.txt" 2>&1
  fi
  env $NEW CUBECL_PROFILE=basic STEPS=2 TAG=new_profile bash $G ours_b8_bf16
  python3 xtask/device/profile_summary.py "$OUT/ours_b8_bf16_new_profile.log" 40 > "$OUT/profile_new_b8.md"
} > "$OUT/run.log" 2>&1
grep -h -o '"tokens_per_second":[0-9.]*\|"peak_delta_gib":[0-9.]*\|"queued_seconds_mean":[0-9.]*' "$OUT"/*.json
