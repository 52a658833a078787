#!/usr/bin/env bash
# The closing measurements of a session on issue 6, one device call: the fast-path checks on
# the GPU (bf16, with both paths also against the f32 reference path; f32), the linear layers'
# GEMMs alone, and the issue's benchmark against the peer over 20 steps. Build first
# (`cargo xtask device-bundle`), then, with the device tool and carry [".device"]:
#
#   bash xtask/device/issue6_final.sh
#
# Results: $OUT/results.tar.xz (the device returns at most 8 files), packed also when the call
# is cut short.
source xtask/device/call.sh issue6
{
  bash $G check_bf16 check_f32 gemm_bf16
  env STEPS=20 bash $G ours_b8_bf16 peer_amp_b8
} > "$OUT/run.log" 2>&1
cd "$OUT" && for f in *.json; do python3 -c "
import json; d=json.load(open('$f'))
print('$f', {k: v for k, v in d.items() if not isinstance(v, (list, dict))})
print('  against_f32:', {k: v for k, v in d.get('against_f32', {}).items() if not isinstance(v, dict)})"; done
