// The flash kernels under emulation (emulate.hpp) against a plain attention in f64 on the same
// bf16 inputs. Run by tests/flash_emulated.rs:
//
//   emulate_test HEAD_DIM BATCH HEADS KV_HEADS SEQ SEED FORWARD_SHARED BACKWARD_SHARED
//                FORWARD_ROWS FORWARD_THREADS BACKWARD_KEYS BACKWARD_THREADS
//
// (the last six: the shared-memory bytes of a forward and a backward block, the queries and
// threads of a forward block, the keys and threads of a backward block, as the CUDA launcher
// gives them, `attention::flash_plan`)
//
// Prints one line of relative errors (max |x - ref| / max |ref|) and exits 1 if one is over its
// tolerance, or if a row that sees no key has a non-zero output or gradient or a finite lse.
// The inputs exercise what the real calls bring: q and dO strided as [batch, seq, heads, d]
// views, a packed row of two segments, a row ending in padding, a length that is not a
// multiple of the tiles.
#define QF_EMULATE
#include "flash.cu"

#include <cstdio>
#include <cstdlib>
#include <random>

namespace {
struct Dims {
  int d, batch, heads, kv_heads, seq;
};

std::vector<u16> random_bf16(size_t n, std::mt19937& rng, float spread) {
  std::normal_distribution<float> normal(0.0f, spread);
  std::vector<u16> out(n);
  for (auto& x : out) x = f32_to_bf16(normal(rng));
  return out;
}

double rel_err(const std::vector<double>& ref, const std::vector<double>& got) {
  double max_ref = 1e-30, max_diff = 0;
  for (size_t i = 0; i < ref.size(); i++) {
    max_ref = std::max(max_ref, std::abs(ref[i]));
    max_diff = std::max(max_diff, std::abs(ref[i] - got[i]));
  }
  return max_diff / max_ref;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 13) {
    std::fprintf(stderr,
                 "usage: %s HEAD_DIM BATCH HEADS KV_HEADS SEQ SEED FORWARD_SHARED BACKWARD_SHARED "
                 "FORWARD_ROWS FORWARD_THREADS BACKWARD_KEYS BACKWARD_THREADS\n",
                 argv[0]);
    return 2;
  }
  Dims m{std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5])};
  std::mt19937 rng(std::atoi(argv[6]));
  const int D = m.d, B = m.batch, H = m.heads, KV = m.kv_heads, S = m.seq, REP = H / KV;
  // q and dO: [batch, seq, heads, D] memory, read as [batch, heads, seq, D]; k, v contiguous.
  auto q = random_bf16((size_t)B * S * H * D, rng, 1.0f);
  auto k = random_bf16((size_t)B * KV * S * D, rng, 1.0f);
  auto v = random_bf16((size_t)B * KV * S * D, rng, 1.0f);
  auto dout = random_bf16((size_t)B * S * H * D, rng, 1.0f);
  auto q_at = [&](int b, int h, int s) { return ((size_t)(b * S + s) * H + h) * D; };
  auto kv_at = [&](int b, int g, int s) { return ((size_t)(b * KV + g) * S + s) * D; };
  // Row 0: one segment then 7 padding positions; row 1 (and on): two packed segments.
  std::vector<int> seg((size_t)B * S);
  for (int b = 0; b < B; b++)
    for (int s = 0; s < S; s++) seg[b * S + s] = b == 0 ? (s < S - 7 ? 1 : 0) : (s < S / 3 ? 1 : 2);

  // The reference, in f64 from the bf16 values.
  const double scale = 1.0 / std::sqrt((double)D);
  std::vector<double> ref_out((size_t)B * H * S * D, 0.0), ref_dq(ref_out.size(), 0.0);
  std::vector<double> ref_lse((size_t)B * H * S, INFINITY);
  std::vector<double> ref_dk((size_t)B * KV * S * D, 0.0), ref_dv(ref_dk.size(), 0.0);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      int g = h / REP;
      for (int i = 0; i < S; i++) {
        std::vector<double> prob(S, 0.0);
        double mx = -INFINITY;
        for (int j = 0; j <= i; j++) {
          if (seg[b * S + j] == 0 || seg[b * S + j] != seg[b * S + i]) continue;
          double dot = 0;
          for (int c = 0; c < D; c++) dot += bf16_to_f32(q[q_at(b, h, i) + c]) * bf16_to_f32(k[kv_at(b, g, j) + c]);
          prob[j] = dot * scale;
          mx = std::max(mx, prob[j]);
        }
        if (mx == -INFINITY) continue;  // sees no key: zeros, lse +inf
        double sum = 0;
        for (int j = 0; j <= i; j++) {
          bool seen = seg[b * S + j] != 0 && seg[b * S + j] == seg[b * S + i];
          prob[j] = seen ? std::exp(prob[j] - mx) : 0.0;
          sum += prob[j];
        }
        size_t row = (size_t)(b * H + h) * S + i;
        ref_lse[row] = mx + std::log(sum);
        for (int j = 0; j <= i; j++) prob[j] /= sum;
        std::vector<double> o(D, 0.0), dp(S, 0.0);
        for (int j = 0; j <= i; j++)
          for (int c = 0; c < D; c++) o[c] += prob[j] * bf16_to_f32(v[kv_at(b, g, j) + c]);
        double delta = 0;
        for (int c = 0; c < D; c++) {
          ref_out[row * D + c] = o[c];
          delta += o[c] * bf16_to_f32(dout[q_at(b, h, i) + c]);
        }
        for (int j = 0; j <= i; j++) {
          if (prob[j] == 0.0) continue;
          for (int c = 0; c < D; c++) dp[j] += bf16_to_f32(dout[q_at(b, h, i) + c]) * bf16_to_f32(v[kv_at(b, g, j) + c]);
          double ds = prob[j] * (dp[j] - delta);
          for (int c = 0; c < D; c++) {
            ref_dq[row * D + c] += scale * ds * bf16_to_f32(k[kv_at(b, g, j) + c]);
            ref_dk[kv_at(b, g, j) + c] += scale * ds * bf16_to_f32(q[q_at(b, h, i) + c]);
            ref_dv[kv_at(b, g, j) + c] += prob[j] * bf16_to_f32(dout[q_at(b, h, i) + c]);
          }
        }
      }
    }

  // The kernels.
  std::vector<u16> out((size_t)B * H * S * D, 0x7fc0);  // [B, S, H, D], as the forward writes it
  std::vector<float> dk(ref_dk.size(), 0.0f), dv(ref_dk.size(), 0.0f);
  std::vector<float> lse((size_t)B * H * S, NAN), delta(lse.size(), NAN), dq(ref_dq.size(), 0.0f);
  const int fwd_rows = std::atoi(argv[9]), bwd_keys = std::atoi(argv[11]);
  const unsigned fwd_threads = std::strtoul(argv[10], nullptr, 10), bwd_threads = std::strtoul(argv[12], nullptr, 10);
  QfForward f{};
  f.q = q.data(), f.k = k.data(), f.v = v.data(), f.qseg = seg.data(), f.kseg = seg.data();
  f.out = out.data(), f.lse = lse.data();
  f.q_b = (long long)S * H * D, f.q_h = D, f.q_s = (long long)H * D;
  f.k_b = f.v_b = (long long)KV * S * D, f.k_h = f.v_h = (long long)S * D, f.k_s = f.v_s = D;
  f.qseg_b = f.kseg_b = S, f.qseg_s = f.kseg_s = 1;
  f.seq = S, f.heads = H, f.kv_heads = KV;
  f.scale_log2 = (float)(scale * 1.4426950408889634);
  size_t fwd_smem = std::strtoul(argv[7], nullptr, 10), bwd_smem = std::strtoul(argv[8], nullptr, 10);
  qf_launch(D == 64 ? qf_forward_64 : qf_forward_128, f, {(unsigned)((S + fwd_rows - 1) / fwd_rows), (unsigned)H, (unsigned)B},
            fwd_smem, fwd_threads);

  QfDelta dl{};
  dl.out = out.data(), dl.dout = dout.data(), dl.delta = delta.data();
  dl.o_b = (long long)S * H * D, dl.o_h = D, dl.o_s = (long long)H * D;
  dl.do_b = f.q_b, dl.do_h = f.q_h, dl.do_s = f.q_s;
  dl.seq = S, dl.heads = H, dl.rows = B * H * S;
  const int delta_rows = 128 / (D / 8);
  qf_launch(D == 64 ? qf_delta_64 : qf_delta_128, dl, {(unsigned)((B * H * S + delta_rows - 1) / delta_rows), 1, 1}, 0, 128);

  QfBackward bw{};
  bw.q = f.q, bw.k = f.k, bw.v = f.v, bw.qseg = f.qseg, bw.kseg = f.kseg, bw.dout = dout.data();
  bw.lse = lse.data(), bw.delta = delta.data(), bw.dq = dq.data(), bw.dk = dk.data(), bw.dv = dv.data();
  bw.q_b = f.q_b, bw.q_h = f.q_h, bw.q_s = f.q_s, bw.k_b = f.k_b, bw.k_h = f.k_h, bw.k_s = f.k_s;
  bw.v_b = f.v_b, bw.v_h = f.v_h, bw.v_s = f.v_s, bw.qseg_b = f.qseg_b, bw.qseg_s = f.qseg_s;
  bw.kseg_b = f.kseg_b, bw.kseg_s = f.kseg_s, bw.do_b = f.q_b, bw.do_h = f.q_h, bw.do_s = f.q_s;
  bw.seq = S, bw.heads = H, bw.kv_heads = KV, bw.scale_log2 = f.scale_log2, bw.scale = (float)scale;
  qf_launch(D == 64 ? qf_backward_64 : qf_backward_128, bw, {(unsigned)((S + bwd_keys - 1) / bwd_keys), (unsigned)H, (unsigned)B},
            bwd_smem, bwd_threads);

  // The output in the reference's [B, H, S, D] order.
  std::vector<double> got_out(out.size());
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < S; i++)
        for (int c = 0; c < D; c++)
          got_out[(((size_t)b * H + h) * S + i) * D + c] = bf16_to_f32(out[(((size_t)b * S + i) * H + h) * D + c]);
  std::vector<double> got_lse(lse.begin(), lse.end()), got_dq(dq.begin(), dq.end());
  // Rows that see no key: exactly zero output and dQ, lse +inf; lse elsewhere compared directly.
  bool empty_rows_ok = true;
  double lse_err = 0;
  for (size_t row = 0; row < ref_lse.size(); row++) {
    if (std::isinf(ref_lse[row])) {
      empty_rows_ok &= std::isinf(lse[row]) && lse[row] > 0;
      for (int c = 0; c < D; c++) empty_rows_ok &= got_out[row * D + c] == 0 && dq[row * D + c] == 0.0f;
    } else {
      lse_err = std::max(lse_err, std::abs(ref_lse[row] - got_lse[row]));
    }
  }
  double e_out = rel_err(ref_out, got_out), e_dq = rel_err(ref_dq, got_dq);
  double e_dk = rel_err(ref_dk, std::vector<double>(dk.begin(), dk.end()));
  double e_dv = rel_err(ref_dv, std::vector<double>(dv.begin(), dv.end()));
  std::printf("out %.3e lse %.3e dq %.3e dk %.3e dv %.3e empty_rows %s\n", e_out, lse_err, e_dq, e_dk, e_dv,
              empty_rows_ok ? "ok" : "WRONG");
  bool ok = e_out < 1.5e-2 && lse_err < 1e-3 && e_dq < 3e-2 && e_dk < 3e-2 && e_dv < 3e-2 && empty_rows_ok;
  return ok ? 0 : 1;
}
