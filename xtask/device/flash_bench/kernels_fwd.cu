// The new flash.cu's forward variants (its production kernels renamed out of the way).
#define qf_forward_64 fwdtu_qf_forward_64
#define qf_forward_128 fwdtu_qf_forward_128
#define qf_backward_64 fwdtu_qf_backward_64
#define qf_backward_128 fwdtu_qf_backward_128
#define qf_delta_64 fwdtu_qf_delta_64
#define qf_delta_128 fwdtu_qf_delta_128
#include "../../../crates/model/src/attention/flash/flash.cu"
QF_KERNEL_BOUNDS(128, 1) v_fwd64_w4(const QfForward p) { forward<64, 4>(p); }
QF_KERNEL_BOUNDS(256, 1) v_fwd64_w8(const QfForward p) { forward<64, 8>(p); }
QF_KERNEL_BOUNDS(128, 1) v_fwd128_w4(const QfForward p) { forward<128, 4>(p); }
QF_KERNEL_BOUNDS(256, 1) v_fwd128_w8(const QfForward p) { forward<128, 8>(p); }
extern "C" __global__ void __launch_bounds__(128, 3) v_fwd128_w4_m3(const QfForward p) { forward<128, 4>(p); }
extern "C" __global__ void __launch_bounds__(128, 4) v_fwd64_w4_m4(const QfForward p) { forward<64, 4>(p); }
