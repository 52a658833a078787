#!/usr/bin/env bash
# The GPU benchmarks of docs/BENCHMARKS.md, in one call on the lent H200 (which has no Rust
# toolchain). Build here first, then send the binaries along:
#
#   cargo xtask device-bundle        # the stripped, xz-compressed CUDA build in .device/ (git-excluded)
#   # device tool: run `bash xtask/device/gpu_bench.sh` with carry [".device"]
#
# Every result is a JSON file in $OUT; ours and the PyTorch peer run in the same call and their
# device memory is sampled by the same NVML sampler (xtask/peer/measure.py).
set -u
OUT=${OUT:-/tmp/qwen-sft-gpu}
mkdir -p "$OUT"
# The binary travels xz-compressed: the working tree sent to the device is capped at 64 MiB.
BIN=/tmp/qwen-sft
python3 -c "import lzma; open('$BIN', 'wb').write(lzma.open('.device/qwen-sft.xz').read())" && chmod +x "$BIN"
# cudarc loads libcuda and NVRTC at run time.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.csv"

# CubeCL compiles every kernel with NVRTC on first use and autotunes matmuls; on a fresh machine
# that took minutes in the first call (docs/BENCHMARKS.md). Keep both caches in one folder, start
# from the one an earlier call brought back (carry `.device`), and send the new one back.
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
CACHE=$PWD/.cubecl-cache
mkdir -p "$CACHE"
[ -f .device/cubecl-cache.tar ] && tar -xf .device/cubecl-cache.tar -C "$CACHE"
cat > cubecl.toml <<TOML
[compilation]
cache = { file = "$CACHE/compilation" }
[autotune]
cache = { file = "$CACHE/autotune" }
TOML
save_cache() { tar -cf "$OUT/cubecl-cache.tar" -C "$CACHE" . 2>/dev/null; }
trap save_cache EXIT
M="python3 xtask/peer/measure.py"
STEPS=${STEPS:-20}

step() { # name timeout command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  $M "$name" "$OUT" "$limit" -- "$@" || echo "$name: exit $?"
}

# In order of importance, so that a call cut short still brings back the main figures.
# The model's real-size check: Qwen2.5-0.5B shapes, forward on [1, 2048].
step forward_f32 90 $BIN bench-forward --preset 0.5b --seq-len 2048 --batch-size 1 --precision f32
# Training: ours and the peer, 0.5b, seq 2048, AdamW, half of every row supervised.
step ours_b4_bf16 200 $BIN bench --preset 0.5b --seq-len 2048 --batch-size 4 --steps "$STEPS" --warmup-steps 2 --precision bf16
step peer_amp_b8 120 python3 xtask/peer/torch_peer.py --preset 0.5b --batch-size 8 --steps "$STEPS" --mode amp
step peer_amp_b4 100 python3 xtask/peer/torch_peer.py --preset 0.5b --batch-size 4 --steps "$STEPS" --mode amp
step ours_b8_bf16 150 $BIN bench --preset 0.5b --seq-len 2048 --batch-size 8 --steps "$STEPS" --warmup-steps 2 --precision bf16
step forward_bf16 60 $BIN bench-forward --preset 0.5b --seq-len 2048 --batch-size 1 --precision bf16
echo "== summary"
cat "$OUT"/*.json
