// Old (baseline_flash.cu) against new (crates/model/src/attention/flash/flash.cu) fused attention
// kernels on the real shapes, in one process: median time of each kernel over ITERS launches
// (cudaEvents) and the largest differences of each new variant's outputs from the baseline's.
// Built and run by run.sh.
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include "types.h"

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e = (x);                                                               \
    if (e != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

typedef void (*FwdK)(const QfForward);
typedef void (*BwdK)(const QfBackward);
typedef void (*DelK)(const QfDelta);
extern "C" {
__global__ void qfbase_forward_64(const QfForward);
__global__ void qfbase_forward_128(const QfForward);
__global__ void qfbase_backward_64(const QfBackward);
__global__ void qfbase_backward_128(const QfBackward);
__global__ void qfbase_delta_64(const QfDelta);
__global__ void qfbase_delta_128(const QfDelta);
__global__ void v_fwd64_w4(const QfForward);
__global__ void v_fwd64_w8(const QfForward);
__global__ void v_fwd128_w4(const QfForward);
__global__ void v_fwd128_w8(const QfForward);
__global__ void v_fwd128_w4_m3(const QfForward);
__global__ void v_fwd64_w4_m4(const QfForward);
// flash.cu's own (production) kernels, renamed per translation unit.
__global__ void fwdtu_qf_forward_64(const QfForward);
__global__ void fwdtu_qf_forward_128(const QfForward);
__global__ void b64tu_qf_backward_64(const QfBackward);
__global__ void b128tu_qf_backward_128(const QfBackward);
__global__ void v_bwd64_w4_r32_m4n(const QfBackward);
__global__ void v_bwd64_w4_r64(const QfBackward);
__global__ void v_bwd64_w8_r64(const QfBackward);
__global__ void v_bwd64_w4_r32_m3(const QfBackward);
__global__ void v_bwd128_w4_r32(const QfBackward);
__global__ void v_bwd128_w8_r32(const QfBackward);
}

static int ITERS = 20;
// flash.cu's QF_FORWARD_WARPS, QF_BACKWARD_WARPS and QF_BACKWARD_ROWS (run.sh passes them).
#ifndef PROD_FWD_WARPS
#error "run.sh defines PROD_FWD_WARPS, PROD_BWD_WARPS and PROD_BWD_ROWS from flash.cu"
#endif

static float bf(u16 x) {
  unsigned u = ((unsigned)x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static u16 to_bf(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (u16)(x >> 16);
}

template <class T>
static std::vector<T> get(const T* d, size_t n) {
  std::vector<T> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

struct Diff {
  double max_abs = 0, max_ref = 0;
};
template <class T, class F>
static Diff diff(const std::vector<T>& ref, const std::vector<T>& got, F val) {
  Diff d;
  for (size_t i = 0; i < ref.size(); i++) {
    double r = val(ref[i]), g = val(got[i]);
    if (std::isinf(r) && std::isinf(g) && r == g) continue;
    d.max_ref = std::max(d.max_ref, std::abs(r));
    double e = std::abs(r - g);
    if (!(e <= d.max_abs)) d.max_abs = std::isnan(e) ? INFINITY : e;
  }
  return d;
}

template <class L>
static float time_ms(L launch, const std::vector<std::pair<void*, size_t>>& zero) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int i = 0; i < ITERS + 3; i++) {
    for (auto& z : zero) CK(cudaMemsetAsync(z.first, 0, z.second));
    CK(cudaEventRecord(a));
    launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    CK(cudaGetLastError());
    float t;
    CK(cudaEventElapsedTime(&t, a, b));
    if (i >= 3) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

static size_t fwd_smem(int d, int warps) { return (size_t)(16 * warps + 4 * 64) * (d + 8) * 2 + 2 * 64 * 4 + 8; }
static size_t bwd_smem(int d, int warps, int br) {
  return (size_t)2 * 16 * warps * (d + 8) * 2 + (size_t)16 * warps * (br + 8) * 2 + (size_t)4 * br * (d + 8) * 2 +
         6 * br * 4 + 8;
}

static void run_shape(const char* name, int D, int B, int H, int KV, int S) {
  std::printf("\n=== %s: batch %d heads %d kv %d d %d seq %d ===\n", name, B, H, KV, D, S);
  size_t nq = (size_t)B * H * S * D, nk = (size_t)B * KV * S * D, nr = (size_t)B * H * S;
  // Inputs: q, dO as [B, S, H, D] viewed [B, H, S, D]; k, v contiguous [B, KV, S, D].
  std::vector<u16> hq(nq), hk(nk), hv(nk), hdo(nq);
  unsigned long long st = 0x9e3779b97f4a7c15ull;
  auto gauss = [&]() {
    float s = 0;
    for (int i = 0; i < 4; i++) {
      st = st * 6364136223846793005ull + 1442695040888963407ull;
      s += (float)((st >> 40) & 0xffffff) / 16777216.0f - 0.5f;
    }
    return s * 1.7320508f;  // variance 1
  };
  for (auto& x : hq) x = to_bf(gauss());
  for (auto& x : hk) x = to_bf(gauss());
  for (auto& x : hv) x = to_bf(gauss());
  for (auto& x : hdo) x = to_bf(gauss() * 0.05f);
  std::vector<int> hseg((size_t)B * S, 1);
  u16 *q, *k, *v, *dout, *out;
  int* seg;
  float *lse, *delta, *dq, *dk, *dv;
  CK(cudaMalloc(&q, nq * 2));
  CK(cudaMalloc(&k, nk * 2));
  CK(cudaMalloc(&v, nk * 2));
  CK(cudaMalloc(&dout, nq * 2));
  CK(cudaMalloc(&out, nq * 2));
  CK(cudaMalloc(&seg, (size_t)B * S * 4));
  CK(cudaMalloc(&lse, nr * 4));
  CK(cudaMalloc(&delta, nr * 4));
  CK(cudaMalloc(&dq, nq * 4));
  CK(cudaMalloc(&dk, nk * 4));
  CK(cudaMalloc(&dv, nk * 4));
  CK(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(k, hk.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dout, hdo.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(seg, hseg.data(), (size_t)B * S * 4, cudaMemcpyHostToDevice));

  const double scale = 1.0 / std::sqrt((double)D);
  QfForward f{};
  f.q = q, f.k = k, f.v = v, f.qseg = seg, f.kseg = seg, f.out = out, f.lse = lse;
  f.q_b = (long long)S * H * D, f.q_h = D, f.q_s = (long long)H * D;
  f.k_b = f.v_b = (long long)KV * S * D, f.k_h = f.v_h = (long long)S * D, f.k_s = f.v_s = D;
  f.qseg_b = f.kseg_b = S, f.qseg_s = f.kseg_s = 1;
  f.seq = S, f.heads = H, f.kv_heads = KV;
  f.scale_log2 = (float)(scale * 1.4426950408889634);
  QfDelta dl{};
  dl.out = out, dl.dout = dout, dl.delta = delta;
  dl.o_b = (long long)S * H * D, dl.o_h = D, dl.o_s = (long long)H * D;
  dl.do_b = f.q_b, dl.do_h = f.q_h, dl.do_s = f.q_s;
  dl.seq = S, dl.heads = H, dl.rows = B * H * S;
  QfBackward bw{};
  bw.q = q, bw.k = k, bw.v = v, bw.qseg = seg, bw.kseg = seg, bw.dout = dout;
  bw.lse = lse, bw.delta = delta, bw.dq = dq, bw.dk = dk, bw.dv = dv;
  bw.q_b = f.q_b, bw.q_h = f.q_h, bw.q_s = f.q_s, bw.k_b = f.k_b, bw.k_h = f.k_h, bw.k_s = f.k_s;
  bw.v_b = f.v_b, bw.v_h = f.v_h, bw.v_s = f.v_s, bw.qseg_b = f.qseg_b, bw.qseg_s = f.qseg_s;
  bw.kseg_b = f.kseg_b, bw.kseg_s = f.kseg_s, bw.do_b = f.q_b, bw.do_h = f.q_h, bw.do_s = f.q_s;
  bw.seq = S, bw.heads = H, bw.kv_heads = KV, bw.scale_log2 = f.scale_log2, bw.scale = (float)scale;

  FwdK base_f = D == 64 ? qfbase_forward_64 : qfbase_forward_128;
  BwdK base_b = D == 64 ? qfbase_backward_64 : qfbase_backward_128;
  DelK base_d = D == 64 ? qfbase_delta_64 : qfbase_delta_128;
  size_t bf_smem = fwd_smem(D, 4), bb_smem = bwd_smem(D, 4, D > 64 ? 32 : 64);
  CK(cudaFuncSetAttribute((const void*)base_f, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bf_smem));
  CK(cudaFuncSetAttribute((const void*)base_b, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bb_smem));
  std::vector<std::pair<void*, size_t>> zero_grads = {{dq, nq * 4}, {dk, nk * 4}, {dv, nk * 4}};

  // Baseline: forward, delta, backward; its outputs are the reference.
  unsigned ftiles = (S + 63) / 64;
  float t_bf = time_ms([&] { base_f<<<dim3(ftiles, H, B), 128, bf_smem>>>(f); }, {});
  auto ref_out = get(out, nq);
  auto ref_lse = get(lse, nr);
  int drows = 128 / (D / 8);
  float t_d = time_ms([&] { base_d<<<(B * H * S + drows - 1) / drows, 128>>>(dl); }, {});
  float t_bb = time_ms([&] { base_b<<<dim3(ftiles, H, B), 128, bb_smem>>>(bw); }, zero_grads);
  auto ref_dq = get(dq, nq), ref_dk = get(dk, nk), ref_dv = get(dv, nk);
  // Once more: the baseline's own run-to-run difference (atomic order), the noise floor.
  time_ms([&] { base_b<<<dim3(ftiles, H, B), 128, bb_smem>>>(bw); }, zero_grads);
  {
    auto a = diff(ref_dq, get(dq, nq), [](float x) { return (double)x; });
    auto c = diff(ref_dk, get(dk, nk), [](float x) { return (double)x; });
    auto e = diff(ref_dv, get(dv, nk), [](float x) { return (double)x; });
    std::printf("baseline vs itself (atomics): dq %.3e dk %.3e dv %.3e (max |ref| %.3e %.3e %.3e)\n", a.max_abs,
                c.max_abs, e.max_abs, a.max_ref, c.max_ref, e.max_ref);
  }
  // The baseline timed again: the timing's own spread.
  float t_bf2 = time_ms([&] { base_f<<<dim3(ftiles, H, B), 128, bf_smem>>>(f); }, {});
  float t_bb2 = time_ms([&] { base_b<<<dim3(ftiles, H, B), 128, bb_smem>>>(bw); }, zero_grads);
  std::printf("%-22s %8.4f ms (again %.4f)\n", "base forward", t_bf, t_bf2);
  std::printf("%-22s %8.4f ms\n", "base delta", t_d);
  std::printf("%-22s %8.4f ms (again %.4f)\n", "base backward", t_bb, t_bb2);

  struct FV { const char* name; FwdK k; int warps; };
  std::vector<FV> fvs = D == 64 ? std::vector<FV>{{"fwd w4", v_fwd64_w4, 4}, {"fwd w8", v_fwd64_w8, 8},
                                                  {"fwd w4 minb4", v_fwd64_w4_m4, 4},
                                                  {"PRODUCTION fwd", fwdtu_qf_forward_64, PROD_FWD_WARPS}}
                                : std::vector<FV>{{"fwd w4", v_fwd128_w4, 4}, {"fwd w8", v_fwd128_w8, 8},
                                                  {"fwd w4 minb3", v_fwd128_w4_m3, 4},
                                                  {"PRODUCTION fwd", fwdtu_qf_forward_128, PROD_FWD_WARPS}};
  for (auto& fv : fvs) {
    size_t sm = fwd_smem(D, fv.warps);
    CK(cudaFuncSetAttribute((const void*)fv.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
    CK(cudaMemset(out, 0xff, nq * 2));
    unsigned tiles = (S + 16 * fv.warps - 1) / (16 * fv.warps);
    float t = time_ms([&] { fv.k<<<dim3(tiles, H, B), 32 * fv.warps, sm>>>(f); }, {});
    auto o = diff(ref_out, get(out, nq), [](u16 x) { return (double)bf(x); });
    auto l = diff(ref_lse, get(lse, nr), [](float x) { return (double)x; });
    std::printf("%-22s %8.4f ms (%.3fx)  out maxdiff %.3e (max|ref| %.3e)  lse maxdiff %.3e\n", fv.name, t,
                t_bf / t, o.max_abs, o.max_ref, l.max_abs);
  }
  // Restore the reference forward's lse/out (the backward reads lse and delta).
  base_f<<<dim3(ftiles, H, B), 128, bf_smem>>>(f);
  base_d<<<(B * H * S + drows - 1) / drows, 128>>>(dl);
  CK(cudaDeviceSynchronize());

  struct BV { const char* name; BwdK k; int warps, br; };
  std::vector<BV> bvs = D == 64 ? std::vector<BV>{{"bwd w4 br64", v_bwd64_w4_r64, 4, 64},
                                                  {"bwd w8 br64", v_bwd64_w8_r64, 8, 64},
                                                  {"bwd w4 br32 minb3", v_bwd64_w4_r32_m3, 4, 32},
                                                  {"bwd w4 br32 minb4 nohold", v_bwd64_w4_r32_m4n, 4, 32},
                                                  {"PRODUCTION bwd", b64tu_qf_backward_64, PROD_BWD_WARPS, PROD_BWD_ROWS}}
                                : std::vector<BV>{{"bwd w4 br32", v_bwd128_w4_r32, 4, 32},
                                                  {"bwd w8 br32", v_bwd128_w8_r32, 8, 32},
                                                  {"PRODUCTION bwd", b128tu_qf_backward_128, PROD_BWD_WARPS, PROD_BWD_ROWS}};
  for (auto& bv : bvs) {
    size_t sm = bwd_smem(D, bv.warps, bv.br);
    CK(cudaFuncSetAttribute((const void*)bv.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
    unsigned tiles = (S + 16 * bv.warps - 1) / (16 * bv.warps);
    float t = time_ms([&] { bv.k<<<dim3(tiles, H, B), 32 * bv.warps, sm>>>(bw); }, zero_grads);
    auto a = diff(ref_dq, get(dq, nq), [](float x) { return (double)x; });
    auto c = diff(ref_dk, get(dk, nk), [](float x) { return (double)x; });
    auto e = diff(ref_dv, get(dv, nk), [](float x) { return (double)x; });
    std::printf("%-22s %8.4f ms (%.3fx)  maxdiff dq %.3e dk %.3e dv %.3e (rel %.2e %.2e %.2e)\n", bv.name, t,
                t_bb / t, a.max_abs, c.max_abs, e.max_abs, a.max_abs / a.max_ref, c.max_abs / c.max_ref,
                e.max_abs / e.max_ref);
  }
  for (void* p : {(void*)q, (void*)k, (void*)v, (void*)dout, (void*)out, (void*)seg, (void*)lse, (void*)delta,
                  (void*)dq, (void*)dk, (void*)dv})
    CK(cudaFree(p));
}

int main(int argc, char** argv) {
  if (argc > 1) ITERS = std::atoi(argv[1]);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs, iters %d (median)\n", prop.name, prop.multiProcessorCount, ITERS);
  run_shape("0.5b", 64, 8, 14, 2, 2048);
  run_shape("1.5b", 128, 4, 12, 2, 2048);
  return 0;
}
