// adamw.cu on the host, one thread per block (tests/adamw_emulated.rs): the norm and two AdamW
// steps over tensors of awkward sizes (empty, one value, a chunk and one more, several chunks),
// some misaligned so that the scalar path runs too, in launches of at most QO_MAX_TENSORS,
// against the same step in f64, with the new values' bf16 copies (all but every fourth tensor)
// against the nearest bf16. Prints one line, `ok ...` or `FAIL ...`.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

struct QoDim {
  unsigned x;
};
static QoDim blockIdx, threadIdx, blockDim;
struct alignas(16) float4 {
  float x, y, z, w;
};

#define QO_HOST
#include "adamw.cu"

static qo_u64 address(const void* p) { return (qo_u64)(uintptr_t)p; }

static float from_bf16(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// The bf16 nearest to a finite `x`, the even one of a tie: of its two bf16 neighbours (the
// truncation and the next one away from zero), by their distances in f64.
static uint16_t nearest_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint16_t low = (uint16_t)(bits >> 16), high = (uint16_t)(low + 1);
  const double to_low = std::fabs((double)x - from_bf16(low));
  const double to_high = std::fabs((double)from_bf16(high) - x);
  if (to_low != to_high) return to_low < to_high ? low : high;
  return (low & 1) ? high : low;
}

// The first block of each of `numels`, then the block count.
static std::vector<int> first_blocks(const std::vector<long long>& numels) {
  std::vector<int> first{0};
  for (long long n : numels) first.push_back(first.back() + (int)((n + QO_CHUNK - 1) / QO_CHUNK));
  return first;
}

template <typename Args>
static void run_blocks(void (*kernel)(const Args), const Args& args, int blocks) {
  blockDim.x = 1;
  threadIdx.x = 0;
  for (int b = 0; b < blocks; ++b) {
    blockIdx.x = (unsigned)b;
    kernel(args);
  }
}

static bool close(double got, double want, double tol, const char* what, int tensor, long long i) {
  const double err = std::fabs(got - want) / std::fmax(std::fabs(want), 1e-30);
  if (err <= tol) return true;
  std::printf("FAIL %s of tensor %d at %lld: %.9g, want %.9g (relative %.3g)\n", what, tensor, i,
              got, want, err);
  return false;
}

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? (unsigned)std::atoi(argv[1]) : 1;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  // 70 tensors: more than one launch's worth.
  std::vector<long long> numels = {0, 1, QO_CHUNK, QO_CHUNK + 1, 3 * QO_CHUNK + 7, 5, 4 * 1000};
  while (numels.size() < 70) numels.push_back(1 + (long long)(rng() % 3000));
  const int n = (int)numels.size();
  long long total = 0;
  std::vector<long long> offsets;
  for (long long len : numels) {
    offsets.push_back(total);
    total += len;
  }
  // One buffer per tensor, one value past a 16-byte boundary for every third tensor.
  std::vector<std::vector<float>> param(n), grad(n), out(n);
  std::vector<std::vector<uint16_t>> copy(n);
  std::vector<const float*> pp(n), gp(n);
  std::vector<float*> op(n);
  std::vector<uint16_t*> cp(n);
  for (int t = 0; t < n; ++t) {
    const int skew = t % 3 == 2 ? 1 : 0;
    for (auto* v : {&param[t], &grad[t], &out[t]}) v->assign(numels[t] + 8, 0.f);
    copy[t].assign(numels[t] + 8, 0xffffu);
    // A copy one bf16 past an 8-byte boundary for tensors whose other buffers are aligned.
    cp[t] = t % 4 == 3 ? nullptr : copy[t].data() + (t % 3 == 1 ? 1 : 0);
    for (long long i = 0; i < numels[t]; ++i) {
      param[t][skew + i] = 0.2f * normal(rng);
      grad[t][skew + i] = normal(rng) * (t % 5 == 0 ? 10.f : 0.1f);
    }
    pp[t] = param[t].data() + skew;
    gp[t] = grad[t].data() + skew;
    op[t] = out[t].data() + skew;
  }
  std::vector<float> m(total + 8, 0.f), v(total + 8, 0.f), m2(total + 8), v2(total + 8);
  std::vector<double> m_ref(total, 0.0), v_ref(total, 0.0);
  std::vector<std::vector<double>> p_ref(n);
  for (int t = 0; t < n; ++t) p_ref[t].assign(pp[t], pp[t] + numels[t]);

  // The norm.
  const std::vector<int> first = first_blocks(numels);
  std::vector<float> partials(first.back() + 1);
  int launches = 0;
  for (int start = 0; start < n; start += QO_MAX_TENSORS) {
    const int count = std::min(QO_MAX_TENSORS, n - start);
    QoNormArgs a{};
    a.partials = address(partials.data());
    for (int i = 0; i < count; ++i) {
      a.grads[i] = address(gp[start + i]);
      a.numel[i] = numels[start + i];
      a.first_block[i] = first[start + i] - first[start];
    }
    a.first_block[count] = first[start + count] - first[start];
    a.tensors = count;
    a.block_offset = first[start];
    run_blocks(qo_norm_partials, a, a.first_block[count]);
    ++launches;
  }
  float norm = 0.f;
  QoFinishArgs fin{address(partials.data()), address(&norm), first.back(), 0};
  run_blocks(qo_norm_finish, fin, 1);
  double sum = 0.0;
  for (int t = 0; t < n; ++t)
    for (long long i = 0; i < numels[t]; ++i) sum += (double)gp[t][i] * gp[t][i];
  if (!close(norm, std::sqrt(sum), 1e-5, "norm", -1, 0)) return 1;

  // Two steps, clipping to a fifth of the norm, decay on even tensors.
  const double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.1;
  const double max_norm = norm / 5.0;
  for (int step = 1; step <= 2; ++step) {
    const double bias1 = 1.0 - std::pow(beta1, step), bias2 = 1.0 - std::pow(beta2, step);
    for (int start = 0; start < n; start += QO_MAX_TENSORS) {
      const int count = std::min(QO_MAX_TENSORS, n - start);
      QoStepArgs a{};
      for (int i = 0; i < count; ++i) {
        const int t = start + i;
        a.param[i] = address(step == 1 ? pp[t] : op[t]);
        a.grad[i] = address(gp[t]);
        a.out[i] = address(op[t]);
        a.copy[i] = address(cp[t]);
        a.moment_offset[i] = offsets[t];
        a.numel[i] = numels[t];
        a.first_block[i] = first[t] - first[start];
        if (t % 2 == 0) a.decays |= 1ull << i;
      }
      a.first_block[count] = first[start + count] - first[start];
      a.tensors = count;
      // Step 2 reads step 1's moments and writes new ones, as the optimizer's flat buffers do.
      a.first = address(step == 1 ? m.data() : m2.data());
      a.second = address(step == 1 ? v.data() : v2.data());
      a.first_out = address(step == 1 ? m2.data() : m.data());
      a.second_out = address(step == 1 ? v2.data() : v.data());
      a.norm = address(&norm);
      a.beta1 = (float)beta1;
      a.beta2 = (float)beta2;
      a.one_minus_beta1 = (float)(1.0 - beta1);
      a.one_minus_beta2 = (float)(1.0 - beta2);
      a.eps = (float)eps;
      a.step_size = (float)(lr / bias1);
      a.bias2_sqrt = (float)std::sqrt(bias2);
      a.decay_factor = (float)(1.0 - lr * wd);
      a.max_norm = (float)max_norm;
      run_blocks(qo_adamw_step, a, a.first_block[count]);
      ++launches;
    }
    const double clip = std::fmin(max_norm / (std::sqrt(sum) + 1e-6), 1.0);
    const std::vector<float>& m_now = step == 1 ? m2 : m;
    const std::vector<float>& v_now = step == 1 ? v2 : v;
    for (int t = 0; t < n; ++t) {
      for (long long i = 0; i < numels[t]; ++i) {
        const long long j = offsets[t] + i;
        const double g = gp[t][i] * clip;
        m_ref[j] = beta1 * m_ref[j] + (1 - beta1) * g;
        v_ref[j] = beta2 * v_ref[j] + (1 - beta2) * g * g;
        const double before = p_ref[t][i];
        if (t % 2 == 0) p_ref[t][i] *= 1.0 - lr * wd;
        p_ref[t][i] -= lr / bias1 * m_ref[j] / (std::sqrt(v_ref[j]) / std::sqrt(bias2) + eps);
        // The update, not the value, against the reference: a lost step is then far off.
        if (!close(op[t][i] - before, p_ref[t][i] - before, 1e-3, "update", t, i) ||
            !close(m_now[j], m_ref[j], 1e-5, "first moment", t, i) ||
            !close(v_now[j], v_ref[j], 1e-5, "second moment", t, i))
          return 1;
        p_ref[t][i] = op[t][i];  // the next step starts from the kernel's value
        if (cp[t] && cp[t][i] != nearest_bf16(op[t][i])) {
          std::printf("FAIL bf16 copy of tensor %d at %lld: %04x for %.9g, want %04x\n", t, i,
                      cp[t][i], op[t][i], nearest_bf16(op[t][i]));
          return 1;
        }
      }
      // Nothing written where no copy was asked for.
      for (uint16_t h : copy[t])
        if (!cp[t] && h != 0xffffu) {
          std::printf("FAIL a copy written for tensor %d\n", t);
          return 1;
        }
    }
  }
  std::printf("ok: %d tensors, %lld values, %d launches\n", n, total, launches);
  return 0;
}
