#define qf_forward_64 b64tu_qf_forward_64
#define qf_forward_128 b64tu_qf_forward_128
#define qf_backward_64 b64tu_qf_backward_64
#define qf_backward_128 b64tu_qf_backward_128
#define qf_delta_64 b64tu_qf_delta_64
#define qf_delta_128 b64tu_qf_delta_128
#include "../../../crates/model/src/attention/flash/flash.cu"
QF_KERNEL_BOUNDS(128, 1) v_bwd64_w4_r64(const QfBackward p) { backward<64, 4, 64, true>(p); }
QF_KERNEL_BOUNDS(256, 1) v_bwd64_w8_r64(const QfBackward p) { backward<64, 8, 64, true>(p); }
extern "C" __global__ void __launch_bounds__(128, 3) v_bwd64_w4_r32_m3(const QfBackward p) { backward<64, 4, 32, true>(p); }
extern "C" __global__ void __launch_bounds__(128, 4) v_bwd64_w4_r32_m4n(const QfBackward p) { backward<64, 4, 32, false>(p); }
