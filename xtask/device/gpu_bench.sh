#!/usr/bin/env bash
# The GPU benchmarks of docs/BENCHMARKS.md, in one call on the lent H200 (which has no Rust
# toolchain). Build here first, then send the binaries along:
#
#   cargo xtask device-bundle        # the stripped, xz-compressed CUDA build in .device/ (git-excluded)
#   # device tool: run `bash xtask/device/gpu_bench.sh` with carry [".device"]
#
# Every result is a JSON file in $OUT; ours and the PyTorch peer run in the same call and their
# device memory is sampled by the same NVML sampler (xtask/peer/measure.py).
#
# The device returns files of up to 16 MiB each. The packed CubeCL cache alone is about 13 MiB:
# bring it back as its own file, never inside an archive of the results (one such archive was
# refused and its raw results lost), or set SAVE_CACHE=0.
set -u
OUT=${OUT:-/tmp/qwen-sft-gpu}
mkdir -p "$OUT"
# The binary travels xz-compressed: the working tree sent to the device is capped at 64 MiB.
BIN=/tmp/qwen-sft
# BINARY picks a variant from `cargo xtask device-bundle --features F`: qwen-sft-cuda-unfused
# (no kernel fusion), qwen-sft-cuda-autotune. GEMM picks the linear layers' body of our runs
# (`--gemm`: cublaslt, the default, cublaslt-cached or burn); a measurement whose name says its body runs that
# one whatever GEMM is. GEMM_MIN_GFLOP keeps smaller products on burn's matmul. KERNELS picks the
# body of the model's own kernels: the attention's block softmax, the rotary embedding, RMSNorm
# (`--kernels`: auto, the default, the kernels on CUDA; or tensor-ops). KERNELS_OFF keeps some of
# them on tensor ops (`--kernels-off`, comma-separated: softmax, rotary, rms-norm).
python3 -c "import lzma; open('$BIN', 'wb').write(lzma.open('.device/${BINARY:-qwen-sft}.xz').read())" && chmod +x "$BIN"
# cudarc loads libcuda and NVRTC at run time.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.csv"

# CubeCL compiles every kernel with NVRTC on first use (and, in a build with the `autotune`
# feature, times about ten candidates per matmul shape: minutes per step, docs/BENCHMARKS.md).
# Keep its caches in one folder, start from the one an earlier call brought back (copy it into
# .device/ and carry `.device`), and send the new one back.
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
CACHE=$PWD/.cubecl-cache
mkdir -p "$CACHE"
[ -f .device/cubecl-cache.tar.xz ] && tar -xJf .device/cubecl-cache.tar.xz -C "$CACHE"
# CUBECL_LOGS=1 also logs every kernel compilation and autotune result to stderr (stamped into
# each measurement's .log); CUBECL_PROFILE=basic times every kernel (slow: one sync per kernel).
if [ "${CUBECL_LOGS:-0}" = 1 ]; then
  COMPILE_LOG='logger = { level = "basic", stderr = true }'
  TUNE_LOG='logger = { level = "minimal", stderr = true }'
fi
cat > cubecl.toml <<TOML
[compilation]
cache = { file = "$CACHE/compilation" }
${COMPILE_LOG:-}
[autotune]
cache = { file = "$CACHE/autotune" }
${TUNE_LOG:-}
[profiling]
logger = { level = "${CUBECL_PROFILE:-disabled}", stderr = true }
TOML
# Files come back from the device only up to 16 MiB each: compressed, it usually fits.
# The driver's own cache of PTX compiled to machine code, kept beside CubeCL's.
export CUDA_CACHE_PATH=$CACHE/nv CUDA_CACHE_MAXSIZE=4294967296
save_cache() { tar -cf - -C "$CACHE" . 2>/dev/null | xz -T0 -6 > "$OUT/cubecl-cache.tar.xz"; du -sh "$CACHE" "$OUT/cubecl-cache.tar.xz"; }
# SAVE_CACHE=0 skips packing it (for all but the last of several calls in one device run).
[ "${SAVE_CACHE:-1}" = 1 ] && trap save_cache EXIT
M="python3 xtask/peer/measure.py"
STEPS=${STEPS:-20}

step() { # name timeout command...
  # TAG tells apart runs of one measurement under different settings (name_TAG.json).
  local name=$1${TAG:+_$TAG} limit=$2; shift 2
  echo "== $name"
  $M "$name" "$OUT" "$limit" -- "$@" || echo "$name: exit $?"
}

# ncu_times NAME COMMAND...: each kernel's GPU time over one run under Nsight Compute, one
# metric (gpu__time_duration: one pass per kernel), without flushing caches between kernels
# and at the GPU's own clocks; CubeCL's, cuBLASLt's and the fused attention's kernels alike,
# without CUBECL_PROFILE's per-kernel syncs (ncu serialises kernels, so the sum leaves out any
# idle time between them). xtask/peer/step_breakdown.py takes one step out of the CSV.
ncu_times() {
  local name=$1${TAG:+_$TAG}; shift
  echo "== $name"
  timeout "${NCU_LIMIT:-300}" /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum \
    --cache-control none --clock-control none --csv --print-units base "$@" \
    > "$OUT/$name.csv" 2> "$OUT/$name.stderr" || echo "$name: exit $?"
  python3 xtask/peer/step_breakdown.py "$OUT/$name.csv" > "$OUT/$name.json" || echo "$name: breakdown exit $?"
  xz -T0 -f "$OUT/$name.csv"
}

# Each measurement by name; the arguments pick which run, in that order (default: all, in order
# of importance, so that a call cut short still brings back the main figures).
ALL="forward_bf16 ours_b4_bf16 peer_amp_b4 peer_amp_b8 ours_b8_bf16 forward_f32"
B=$BIN
G="--gemm ${GEMM:-cublaslt} ${GEMM_MIN_GFLOP:+--gemm-min-gflop $GEMM_MIN_GFLOP} ${KERNELS:+--kernels $KERNELS} ${KERNELS_OFF:+--kernels-off $KERNELS_OFF}"
for name in ${@:-$ALL}; do
  case $name in
    # The model's real-size check: Qwen2.5-0.5B shapes, forward on [1, 2048].
    forward_bf16) step $name ${FORWARD_LIMIT:-150} $B bench-forward $G --preset 0.5b --seq-len 2048 --batch-size 1 --precision bf16 ;;
    forward_f32)  step $name 120 $B bench-forward $G --preset 0.5b --seq-len 2048 --batch-size 1 --precision f32 ;;
    # Training: ours and the peer, 0.5b, seq 2048, AdamW, half of every row supervised.
    ours_b4_bf16) step $name ${TRAIN_LIMIT:-300} $B bench $G --preset 0.5b --seq-len 2048 --batch-size 4 --steps "$STEPS" --warmup-steps 2 --precision bf16 --attention-chunk-mib "${ATTN_MIB:-1024}" ;;
    ours_b8_bf16) step $name 240 $B bench $G --preset 0.5b --seq-len 2048 --batch-size 8 --steps "$STEPS" --warmup-steps 2 --precision bf16 --attention-chunk-mib "${ATTN_MIB:-1024}" --loss-chunk-mib "${LOSS_MIB:-1024}" ;;
    # The same with samples of the host's time (a `cuda,host-profile` build:
    # BINARY=qwen-sft-cuda-host-profile); xtask/peer/host_profile.py reads NAME.stacks.
    profile_b8)   step $name 240 $B bench $G --preset 0.5b --seq-len 2048 --batch-size 8 --steps "$STEPS" --warmup-steps 2 --precision bf16 --attention-chunk-mib "${ATTN_MIB:-1024}" --loss-chunk-mib "${LOSS_MIB:-1024}" --host-profile "$OUT/$name.stacks" ;;
    ours_b8_burn) step $name 240 $B bench --gemm burn --preset 0.5b --seq-len 2048 --batch-size 8 --steps "$STEPS" --warmup-steps 2 --precision bf16 --attention-chunk-mib "${ATTN_MIB:-1024}" ;;
    # Issue 6's second model: 1.5b at batch 4.
    ours_1p5b_b4) step $name 300 $B bench $G --preset 1.5b --seq-len 2048 --batch-size 4 --steps "$STEPS" --warmup-steps 2 --precision bf16 --attention-chunk-mib "${ATTN_MIB:-1024}" ;;
    peer_amp_1p5b_b4) step $name 150 python3 xtask/peer/torch_peer.py --preset 1.5b --batch-size 4 --steps "$STEPS" --mode amp ;;
    # Issue 6's rule: the fast path's loss curve against the reference path's (plain attention,
    # burn's matmul), same data, same seed, batch 4 (the reference attention stores every
    # layer's scores: batch 8 does not fit).
    curve_fast_b4) step $name ${CURVE_LIMIT:-150} $B bench $G --preset 0.5b --seq-len 2048 --batch-size 4 --steps 50 --warmup-steps 0 --precision bf16 --attention-chunk-mib "${ATTN_MIB:-1024}" ;;
    curve_ref_b4)  step $name ${CURVE_LIMIT:-150} $B bench --gemm burn --preset 0.5b --seq-len 2048 --batch-size 4 --steps 50 --warmup-steps 0 --precision bf16 --attention reference ;;
    # The linear layers' GEMMs of a 0.5b step at batch 4 (8192 tokens): the chosen body against
    # burn's matmul, time and difference.
    gemm_bf16)    step $name ${GEMM_LIMIT:-120} $B bench-linear $G --preset 0.5b --rows 8192 --precision bf16 --iterations 10 ;;
    ours_b8_ref)  step $name 240 $B bench $G --preset 0.5b --seq-len 2048 --batch-size 8 --steps "$STEPS" --warmup-steps 2 --precision bf16 --attention reference ;;
    peer_amp_b4)  step $name ${PEER_LIMIT:-100} python3 xtask/peer/torch_peer.py --preset 0.5b --batch-size 4 --steps "$STEPS" --mode amp ;;
    peer_amp_b8)  step $name 120 python3 xtask/peer/torch_peer.py --preset 0.5b --batch-size 8 --steps "$STEPS" --mode amp ;;
    # Issue 6's rule: the fast path (chunked attention, the chosen linear body) against the
    # reference path (plain attention, burn's matmul), logits and gradients.
    check_bf16)   step $name ${CHECK_LIMIT:-120} $B check-fast-path $G --model tests/fixtures/model/tied_f32 --precision bf16 ;;
    # The fused attention against the chunked one and f32 at 0.5b's and 1.5b's attention sizes.
    # With --iterations, each also times the fused and the chunked attention (forward and
    # backward); the peers time PyTorch's scaled_dot_product_attention at the same sizes.
    check_attn_64)  step $name 120 $B check-attention --heads 14 --kv-heads 2 --head-dim 64 --seq-len 2048 --batch-size 8 --iterations "${ATTN_ITERS:-10}" ;;
    check_attn_128) step $name 120 $B check-attention --heads 12 --kv-heads 2 --head-dim 128 --seq-len 2048 --batch-size 4 --iterations "${ATTN_ITERS:-10}" ;;
    peer_attn_64)   step $name 60 python3 xtask/peer/attention_peer.py --heads 14 --kv-heads 2 --head-dim 64 --seq-len 2048 --batch-size 8 --iterations "${ATTN_ITERS:-10}" ;;
    peer_attn_128)  step $name 60 python3 xtask/peer/attention_peer.py --heads 12 --kv-heads 2 --head-dim 128 --seq-len 2048 --batch-size 4 --iterations "${ATTN_ITERS:-10}" ;;
    # Where a step's GPU time goes, ours and the peer's: three steps (one warm-up) under ncu,
    # the last one taken apart by step_breakdown.py.
    ncu_b8)       ncu_times $name $B bench $G --preset 0.5b --seq-len 2048 --batch-size 8 --steps 2 --warmup-steps 1 --precision bf16 --attention-chunk-mib "${ATTN_MIB:-1024}" --loss-chunk-mib "${LOSS_MIB:-1024}" ;;
    ncu_1p5b_b4)  ncu_times $name $B bench $G --preset 1.5b --seq-len 2048 --batch-size 4 --steps 2 --warmup-steps 1 --precision bf16 --attention-chunk-mib "${ATTN_MIB:-1024}" ;;
    ncu_peer_1p5b_b4) ncu_times $name python3 xtask/peer/torch_peer.py --preset 1.5b --batch-size 4 --steps 2 --warmup-steps 1 --mode amp ;;
    ncu_peer_b8)  ncu_times $name python3 xtask/peer/torch_peer.py --preset 0.5b --batch-size 8 --steps 2 --warmup-steps 1 --mode amp ;;
    check_f32)    step $name 120 $B check-fast-path $G --model tests/fixtures/model/tied_f32 --precision f32 --tolerance 1e-3 ;;
    *) echo "unknown measurement: $name" ;;
  esac
done
echo "== summary"
cat "$OUT"/*.json
