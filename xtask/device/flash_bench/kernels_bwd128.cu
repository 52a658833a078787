#define qf_forward_64 b128tu_qf_forward_64
#define qf_forward_128 b128tu_qf_forward_128
#define qf_backward_64 b128tu_qf_backward_64
#define qf_backward_128 b128tu_qf_backward_128
#define qf_delta_64 b128tu_qf_delta_64
#define qf_delta_128 b128tu_qf_delta_128
#include "../../../crates/model/src/attention/flash/flash.cu"
QF_KERNEL_BOUNDS(128, 1) v_bwd128_w4_r32(const QfBackward p) { backward<128, 4, 32, false>(p); }
QF_KERNEL_BOUNDS(256, 1) v_bwd128_w8_r32(const QfBackward p) { backward<128, 8, 32, false>(p); }
