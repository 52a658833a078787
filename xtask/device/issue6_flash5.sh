#!/usr/bin/env bash
# Issue 6, session 13, eighth device call: the backward's dS^T stored in pairs and the vector
# reductions. As issue6_flash4.sh without ncu: the attention alone against PyTorch's SDPA (same
# call), 0.5b batch 8 and 1.5b batch 4 against their peers, the fast path's 50-step curve
# (against call 2's reference curve). Build first (`cargo xtask device-bundle`), then with
# carry [".device"]:
#
#   bash xtask/device/issue6_flash5.sh
set -u
O=${OUT:-/tmp/issue6}
export OUT=/tmp/issue6-results SAVE_CACHE=0 STEPS=${STEPS:-8} ATTN_ITERS=${ATTN_ITERS:-30}
mkdir -p "$OUT" "$O"
trap 'tar -cJf "$O/results.tar.xz" -C "$OUT" .' EXIT
G=xtask/device/gpu_bench.sh
{
  bash $G check_attn_128 peer_attn_128 check_attn_64 peer_attn_64
  bash $G ours_b8_bf16 peer_amp_b8
  bash $G ours_1p5b_b4 peer_amp_1p5b_b4
  bash $G curve_fast_b4
} > "$OUT/run.log" 2>&1
cd "$OUT" && for f in *.json; do python3 -c "
import json; d=json.load(open('$f'))
keys=('tokens_per_second','peak_delta_gib','fused_attention_passes_per_step','pass','fused_passes','fused_vs_f32','chunked_vs_f32','fused_seconds','chunked_seconds','seconds')
print('$f', {k: d.get(k) for k in keys if k in d})"; done
grep -i "error\|panic\|exit" "$OUT/run.log" | head -20
