#!/usr/bin/env bash
# Which of the model's kernels moves the fast-path check on the GPU: check-fast-path in f32 and
# bf16 with the tensor-op bodies, with every kernel, and with each kernel turned off in turn
# (`--kernels-off`). One device call; build first (`cargo xtask device-bundle`), then with
# carry [".device"]:
#
#   bash xtask/device/kernel_checks.sh
#
# Prints one line per check; everything is also packed into $OUT/results.tar.xz.
source xtask/device/call.sh kernel-checks
{
  for precision in f32 bf16; do
    env KERNELS=tensor-ops TAG=tensor_ops bash $G check_$precision
    env KERNELS=auto TAG=all bash $G check_$precision
    for off in softmax rotary rms-norm; do
      env KERNELS=auto KERNELS_OFF=$off TAG=off_${off/-/_} bash $G check_$precision
    done
  done
} > "$OUT/run.log" 2>&1
cd "$OUT" && for f in check_*.json; do python3 -c "
import json; d=json.load(open('$f')); a=d.get('against_f32', {})
print('$f', d['kernels'], 'logits', d['logits_rel'], 'loss', d['loss_rel'], 'grad', d['grad_rel_max'], d['grad_rel_worst_param'], 'pass', d['pass'],
      '| vs f32: closest', a.get('closest_figure'), a.get('closest_fast'), a.get('closest_reference'))"; done
