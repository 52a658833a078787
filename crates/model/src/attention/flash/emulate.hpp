// flash.cu on the host: every thread of a block is an OS thread, and each warp-wide instruction
// (mma.sync, ldmatrix, shfl) is emulated from its PTX ISA definition, with the lanes meeting at
// a barrier before and after. Slow, exact enough, and independent of any GPU: it checks the
// kernels' indexing, masking, fragment layouts and synchronisation (tests/flash_emulated.rs).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

typedef unsigned short u16;
typedef unsigned int u32;

#define __align__(n) alignas(n)
#define QF_DEV inline
#define QF_KERNEL void
#define QF_KERNEL_BOUNDS(threads, blocks) void
#define QF_DECLARE_SMEM(name) unsigned char* name = qf_emu::block->shared.data()
#define QF_SYNC_BLOCK() qf_emu::block->barrier.arrive_and_wait()
// A kernel's shared-memory layout must end within what the launch gave it.
#define QF_CHECK_SHARED(end)                                                                  \
  do {                                                                                        \
    if ((const unsigned char*)(end) > qf_emu::block->shared.data() + qf_emu::block->shared.size()) { \
      std::fprintf(stderr, "shared memory layout exceeds the %zu bytes given\n",            \
                   qf_emu::block->shared.size());                                             \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

struct QfDim {
  unsigned x, y, z;
};

namespace qf_emu {
struct Warp {
  std::barrier<> barrier{32};
  u32 a[32][4], b[32][2];
  float c[32][4], value[32];
  const u16* row[32];
};

// Up to 8 warps; `threads` of them take part in the barrier.
struct Block {
  explicit Block(int threads) : barrier(threads) {}
  std::barrier<> barrier;
  std::vector<unsigned char> shared;
  Warp warps[8];
};

inline thread_local Block* block;
inline thread_local QfDim thread_index, block_index;
inline QfDim grid_dim;

inline Warp& warp() { return block->warps[thread_index.x / 32]; }
inline int lane() { return thread_index.x % 32; }
}  // namespace qf_emu

#define threadIdx (qf_emu::thread_index)
#define blockIdx (qf_emu::block_index)
#define gridDim (qf_emu::grid_dim)

inline float __uint_as_float(u32 x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __int_as_float(int x) { return __uint_as_float((u32)x); }
inline u32 float_bits(float f) {
  u32 x;
  std::memcpy(&x, &f, 4);
  return x;
}

inline float bf16_to_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }
// Round to nearest even, as cvt.rn.bf16 does (no NaN reaches it here).
inline u16 f32_to_bf16(float f) {
  u32 x = float_bits(f);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (u16)(x >> 16);
}
inline u32 pack_bf16(float lo, float hi) { return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16); }
inline float qf_exp2(float x) { return std::exp2(x); }
inline float qf_log2(float x) { return std::log2(x); }
inline void atomic_add2(float* at, float x, float y) {
  std::atomic_ref<float>(at[0]).fetch_add(x);
  std::atomic_ref<float>(at[1]).fetch_add(y);
}

// cp.async: the copy happens at once (zeros when not valid); commit and wait have nothing to
// do. Emulation therefore cannot see a missing wait or barrier around a copy, only wrong
// buffers and addresses.
inline void copy_async16(void* dst, const void* src, bool valid) {
  if (valid) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
}
inline void copy_async4(void* dst, const void* src, bool valid) {
  if (valid) std::memcpy(dst, src, 4);
  else std::memset(dst, 0, 4);
}
inline void copy_async_commit() {}
inline void copy_async_wait() {}

inline float shfl_xor(float x, int mask) {
  qf_emu::Warp& w = qf_emu::warp();
  int lane = qf_emu::lane();
  w.value[lane] = x;
  w.barrier.arrive_and_wait();
  float other = w.value[lane ^ mask];
  w.barrier.arrive_and_wait();
  return other;
}

// __all_sync over the whole warp.
inline bool warp_all(bool predicate) {
  qf_emu::Warp& w = qf_emu::warp();
  w.value[qf_emu::lane()] = predicate ? 1.0f : 0.0f;
  w.barrier.arrive_and_wait();
  bool all = true;
  for (int lane = 0; lane < 32; lane++) all = all && w.value[lane] != 0.0f;
  w.barrier.arrive_and_wait();
  return all;
}

inline float half_of(u32 reg, int high) { return bf16_to_f32((u16)(high ? reg >> 16 : reg & 0xffffu)); }

// D = A B + C for m16n8k16, each lane computing its own four outputs from every lane's
// fragments (layouts in flash.cu's header).
inline void mma_bf16(float* c, const u32* a, const u32* b) {
  qf_emu::Warp& w = qf_emu::warp();
  int lane = qf_emu::lane();
  std::memcpy(w.a[lane], a, sizeof(u32) * 4);
  std::memcpy(w.b[lane], b, sizeof(u32) * 2);
  w.barrier.arrive_and_wait();
  auto a_at = [&](int r, int k) {
    int reg = (r < 8 ? 0 : 1) + (k < 8 ? 0 : 2);
    return half_of(w.a[(r % 8) * 4 + (k % 8) / 2][reg], k % 2);
  };
  auto b_at = [&](int k, int n) { return half_of(w.b[n * 4 + (k % 8) / 2][k < 8 ? 0 : 1], k % 2); };
  int g = lane / 4, t = lane % 4;
  float d[4];
  for (int e = 0; e < 4; e++) {
    int r = g + 8 * (e / 2), n = 2 * t + e % 2;
    double sum = c[e];
    for (int k = 0; k < 16; k++) sum += (double)a_at(r, k) * (double)b_at(k, n);
    d[e] = (float)sum;
  }
  w.barrier.arrive_and_wait();
  std::memcpy(c, d, sizeof(float) * 4);
}

// The ldmatrix family: every lane gives a row address, then each lane reads what the
// instruction hands it (`take(rows, g, t)`) once all have.
template <class Take>
inline void exchange_rows(const u16* row, Take take) {
  qf_emu::Warp& w = qf_emu::warp();
  int lane = qf_emu::lane();
  w.row[lane] = row;
  w.barrier.arrive_and_wait();
  take(w.row, lane / 4, lane % 4);
  w.barrier.arrive_and_wait();
}

inline u32 pair(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

// ldmatrix.m8n8.x4: lanes 8m..8m+7 give the rows of matrix m; each lane receives M_m[g][2t..2t+1]
// in register m.
inline void ldmatrix_x4(u32* r, const u16* row) {
  exchange_rows(row, [&](const u16* const* rows, int g, int t) {
    for (int m = 0; m < 4; m++) r[m] = pair(rows[m * 8 + g][2 * t], rows[m * 8 + g][2 * t + 1]);
  });
}

// The .trans form: register m holds (M_m[2t][g], M_m[2t + 1][g]).
inline void ldmatrix_x4_trans(u32* r, const u16* row) {
  exchange_rows(row, [&](const u16* const* rows, int g, int t) {
    for (int m = 0; m < 4; m++) r[m] = pair(rows[m * 8 + 2 * t][g], rows[m * 8 + 2 * t + 1][g]);
  });
}

// stmatrix.m8n8.x4 (the converse of ldmatrix_x4): lanes 8m..8m+7 give the rows of matrix m;
// each lane's register m goes to M_m[g][2t..2t+1].
#define QF_STMATRIX 1
inline void stmatrix_x4(u16* row, const u32* r) {
  exchange_rows(row, [&](const u16* const* rows, int g, int t) {
    for (int m = 0; m < 4; m++) {
      u16* at = const_cast<u16*>(rows[m * 8 + g]) + 2 * t;
      at[0] = (u16)(r[m] & 0xffffu);
      at[1] = (u16)(r[m] >> 16);
    }
  });
}

// Runs `kernel` over `grid`, one block after another, `block_threads` threads each (at most 256).
template <class P>
void qf_launch(void (*kernel)(const P), const P& params, QfDim grid, size_t shared_bytes,
               unsigned block_threads) {
  if (block_threads == 0 || block_threads > 256 || block_threads % 32 != 0) {
    std::fprintf(stderr, "qf_launch: %u threads per block\n", block_threads);
    std::abort();
  }
  qf_emu::grid_dim = grid;
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) {
        auto block = std::make_unique<qf_emu::Block>((int)block_threads);
        block->shared.assign(shared_bytes, 0xcd);  // garbage, as on a GPU
        std::vector<std::thread> threads;
        for (unsigned i = 0; i < block_threads; i++)
          threads.emplace_back([&, i] {
            qf_emu::block = block.get();
            qf_emu::thread_index = {i, 0, 0};
            qf_emu::block_index = {x, y, z};
            kernel(params);
          });
        for (auto& thread : threads) thread.join();
      }
}
