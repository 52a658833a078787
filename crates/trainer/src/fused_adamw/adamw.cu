// AdamW over many parameter tensors per launch, with the global gradient norm for clipping.
//
//   qo_norm_partials: per block of QO_CHUNK gradient values, their sum of squares -> partials
//   qo_norm_finish:   one block: the partials summed in f64 in a fixed order -> norm = sqrt
//   qo_adamw_step:    per block of QO_CHUNK values of one parameter: clip, moments, decay, step
//
// A launch covers up to QO_MAX_TENSORS tensors, listed in its argument struct (by value, under
// CUDA's 4 KiB of kernel parameters); block b belongs to tensor i when
// first_block[i] <= b < first_block[i + 1]. The step reads the parameter, its gradient and both
// moments once and writes the parameter and the moments once (28 bytes a value), in f32; where
// asked, it also writes the new value's bf16 copy for the model's bf16 compute (2 bytes more;
// qwen_gemm::copies keeps it, so the model's casts of the parameter find it).
//
// The same source compiles on the host with QO_HOST defined (adamw_host_test.cpp), one thread
// per block, to test the indexing and the arithmetic without a GPU.

#define QO_CHUNK 16384
#define QO_MAX_TENSORS 64
#define QO_THREADS 256

#ifdef QO_HOST
#define QO_KERNEL static void
#define QO_DEV static inline
#else
#define QO_KERNEL extern "C" __global__ void __launch_bounds__(QO_THREADS)
#define QO_DEV __device__ __forceinline__
#endif

typedef unsigned long long qo_u64;
typedef long long qo_i64;
typedef unsigned short qo_u16;

// f32 to bf16, rounded to nearest even (NaN stays NaN), as a cast kernel rounds.
#ifdef QO_HOST
QO_DEV qo_u16 qo_bf16(float x) {
  unsigned bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (qo_u16)((bits >> 16) | 0x40u);
  return (qo_u16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
#else
QO_DEV qo_u16 qo_bf16(float x) {
  qo_u16 out;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out) : "f"(x));
  return out;
}
#endif

// Field for field `NormArgs` in mod.rs.
struct QoNormArgs {
  qo_u64 grads[QO_MAX_TENSORS];
  qo_i64 numel[QO_MAX_TENSORS];
  qo_u64 partials;  // f32 [all blocks of every launch]; this launch writes from block_offset
  int first_block[QO_MAX_TENSORS + 1];
  int tensors;
  int block_offset;
  int pad;
};

// `FinishArgs` in mod.rs.
struct QoFinishArgs {
  qo_u64 partials;
  qo_u64 norm;  // f32 [1]
  int count;
  int pad;
};

// `StepArgs` in mod.rs.
struct QoStepArgs {
  qo_u64 param[QO_MAX_TENSORS];
  qo_u64 grad[QO_MAX_TENSORS];
  qo_u64 out[QO_MAX_TENSORS];
  qo_u64 copy[QO_MAX_TENSORS];  // bf16 [numel] each, or 0: no copy
  // Where each tensor's values start in the flat moments of its group.
  qo_i64 moment_offset[QO_MAX_TENSORS];
  qo_i64 numel[QO_MAX_TENSORS];
  qo_u64 first, second, first_out, second_out;  // f32 flat moments of the group
  qo_u64 norm;                                   // f32 [1], the pre-clip global norm
  int first_block[QO_MAX_TENSORS + 1];
  int tensors;
  // Bit i: tensor i decays.
  qo_u64 decays;
  float beta1, beta2;
  // 1 - beta1 and 1 - beta2, from the betas in f64 (1 - 0.999f in f32 is 1.3e-5 off).
  float one_minus_beta1, one_minus_beta2;
  float eps;
  float step_size;      // lr / (1 - beta1^t)
  float bias2_sqrt;     // sqrt(1 - beta2^t)
  float decay_factor;   // 1 - lr * weight_decay
  float max_norm;       // 0: no clipping
  int pad;
};

// The tensor that block `b` works on: the last i with first_block[i] <= b.
QO_DEV int qo_tensor_of(const int* first_block, int tensors, int b) {
  int lo = 0, hi = tensors - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (first_block[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

#ifdef QO_HOST
QO_DEV float qo_block_sum(float x) { return x; }  // one thread per block on the host
#else
// The sum over the block's threads, in a fixed order; every thread gets it.
__device__ float qo_block_sum(float x) {
  __shared__ float warps[QO_THREADS / 32];
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < QO_THREADS / 32; ++w) total += warps[w];
  return total;
}
#endif

QO_DEV bool qo_aligned(const void* p) { return ((qo_u64)p & 15) == 0; }

QO_KERNEL qo_norm_partials(const QoNormArgs a) {
  const int b = blockIdx.x;
  const int t = qo_tensor_of(a.first_block, a.tensors, b);
  const qo_i64 start = (qo_i64)(b - a.first_block[t]) * QO_CHUNK;
  const qo_i64 end = start + QO_CHUNK < a.numel[t] ? start + QO_CHUNK : a.numel[t];
  const float* g = (const float*)a.grads[t];
  float sum = 0.f;
  qo_i64 i = start;
  if (qo_aligned(g)) {  // start is a multiple of 4
    const qo_i64 n4 = (end - start) / 4;
    for (qo_i64 k = threadIdx.x; k < n4; k += blockDim.x) {
      const float4 v = *(const float4*)(g + start + 4 * k);
      sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    i = start + 4 * n4;
  }
  for (qo_i64 k = i + threadIdx.x; k < end; k += blockDim.x) sum += g[k] * g[k];
  sum = qo_block_sum(sum);
  if (threadIdx.x == 0) ((float*)a.partials)[a.block_offset + b] = sum;
}

#ifdef QO_HOST
QO_KERNEL qo_norm_finish(const QoFinishArgs a) {
  double total = 0.0;
  for (int i = 0; i < a.count; ++i) total += ((const float*)a.partials)[i];
  *(float*)a.norm = (float)sqrt(total);
}
#else
// One block of QO_THREADS threads.
QO_KERNEL qo_norm_finish(const QoFinishArgs a) {
  __shared__ double parts[QO_THREADS];
  double total = 0.0;
  for (int i = threadIdx.x; i < a.count; i += QO_THREADS) total += ((const float*)a.partials)[i];
  parts[threadIdx.x] = total;
  __syncthreads();
  for (int half = QO_THREADS / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) parts[threadIdx.x] += parts[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *(float*)a.norm = (float)sqrt(parts[0]);
}
#endif

// torch.optim.AdamW's update of one value (decay first), after clipping the gradient.
struct QoRule {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, bias2_sqrt, decay_factor,
      clip;
  bool decays;
};

QO_DEV void qo_adamw_one(const QoRule& r, float& p, float g, float& m, float& v) {
  g *= r.clip;
  m = r.beta1 * m + r.one_minus_beta1 * g;
  v = r.beta2 * v + r.one_minus_beta2 * (g * g);
  const float denom = sqrtf(v) / r.bias2_sqrt + r.eps;
  if (r.decays) p *= r.decay_factor;
  p -= r.step_size * (m / denom);
}

QO_KERNEL qo_adamw_step(const QoStepArgs a) {
  const int b = blockIdx.x;
  const int t = qo_tensor_of(a.first_block, a.tensors, b);
  const qo_i64 start = (qo_i64)(b - a.first_block[t]) * QO_CHUNK;
  const qo_i64 end = start + QO_CHUNK < a.numel[t] ? start + QO_CHUNK : a.numel[t];
  QoRule r;
  r.beta1 = a.beta1;
  r.beta2 = a.beta2;
  r.one_minus_beta1 = a.one_minus_beta1;
  r.one_minus_beta2 = a.one_minus_beta2;
  r.eps = a.eps;
  r.step_size = a.step_size;
  r.bias2_sqrt = a.bias2_sqrt;
  r.decay_factor = a.decay_factor;
  r.decays = (a.decays >> t) & 1;
  r.clip = 1.f;
  if (a.max_norm > 0.f) {
    // torch.nn.utils.clip_grad_norm_: clamp(max_norm / (norm + 1e-6), max=1).
    const float clip = a.max_norm / (*(const float*)a.norm + 1e-6f);
    r.clip = clip < 1.f ? clip : 1.f;
  }
  const float* p = (const float*)a.param[t];
  const float* g = (const float*)a.grad[t];
  float* out = (float*)a.out[t];
  const float* m = (const float*)a.first + a.moment_offset[t];
  const float* v = (const float*)a.second + a.moment_offset[t];
  float* m_out = (float*)a.first_out + a.moment_offset[t];
  float* v_out = (float*)a.second_out + a.moment_offset[t];
  qo_u16* copy = (qo_u16*)a.copy[t];
  qo_i64 i = start;
  if (qo_aligned(p) && qo_aligned(g) && qo_aligned(out) && qo_aligned(m) && qo_aligned(v) &&
      qo_aligned(m_out) && qo_aligned(v_out) && ((qo_u64)copy & 7) == 0) {
    const qo_i64 n4 = (end - start) / 4;
    for (qo_i64 k = threadIdx.x; k < n4; k += blockDim.x) {
      const qo_i64 j = start + 4 * k;
      float4 pv = *(const float4*)(p + j);
      const float4 gv = *(const float4*)(g + j);
      float4 mv = *(const float4*)(m + j);
      float4 vv = *(const float4*)(v + j);
      qo_adamw_one(r, pv.x, gv.x, mv.x, vv.x);
      qo_adamw_one(r, pv.y, gv.y, mv.y, vv.y);
      qo_adamw_one(r, pv.z, gv.z, mv.z, vv.z);
      qo_adamw_one(r, pv.w, gv.w, mv.w, vv.w);
      *(float4*)(out + j) = pv;
      *(float4*)(m_out + j) = mv;
      *(float4*)(v_out + j) = vv;
      if (copy) {  // four bf16 in one 8-byte store (j is a multiple of 4)
        const qo_u64 packed = (qo_u64)qo_bf16(pv.x) | (qo_u64)qo_bf16(pv.y) << 16 |
                              (qo_u64)qo_bf16(pv.z) << 32 | (qo_u64)qo_bf16(pv.w) << 48;
        *(qo_u64*)(copy + j) = packed;
      }
    }
    i = start + 4 * n4;
  }
  for (qo_i64 j = i + threadIdx.x; j < end; j += blockDim.x) {
    float pj = p[j], mj = m[j], vj = v[j];
    qo_adamw_one(r, pj, g[j], mj, vj);
    out[j] = pj;
    m_out[j] = mj;
    v_out[j] = vj;
    if (copy) copy[j] = qo_bf16(pj);
  }
}
