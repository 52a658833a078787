// Fused causal grouped-query attention for bf16 on tensor cores (mma.sync m16n8k16), forward
// and backward, in the FlashAttention-2 scheme: the scores never leave the chip.
//
// Compiled at run time by NVRTC (flash/mod.rs), with no header: every intrinsic that is not an
// NVRTC builtin is inline PTX. The same source compiles on the host with QF_EMULATE defined
// (emulate.hpp), where each thread of a block is an OS thread and the warp-wide instructions
// are emulated from their PTX ISA definitions; tests/flash_emulated.rs runs it against a plain
// attention, so the kernels' logic is tested without a GPU.
//
// Who sees whom (attention/mask.rs): query i sees key j iff j <= i and both carry the same
// non-zero segment id. Queries and keys share positions (no offset, no window: `takes` in
// attention/flash_plan.rs sends anything else to the chunked path).
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major), 4 registers of 2 bf16: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1],
//     a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16x8, "col"), 2 registers: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C/D (16x8 f32), 4 registers: c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// So two C tiles side by side (16x16) hold exactly the values of one A fragment: a score tile
// becomes the probabilities' A operand without leaving the registers.

#ifdef QF_EMULATE
#include "emulate.hpp"
#else
#define QF_DEV __device__ __forceinline__
#define QF_KERNEL extern "C" __global__ void __launch_bounds__(128)
#define QF_DECLARE_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
typedef unsigned short u16;
typedef unsigned int u32;

QF_DEV void mma_bf16(float* c, const u32* a, const u32* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

QF_DEV u32 shared_address(const void* p) {
  u32 address;
  asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
               : "=r"(address) : "l"(p));
  return address;
}

// Four 8x8 matrices of b16 from shared memory: lanes 8m..8m+7 give the rows of matrix m, and
// each lane receives, from matrix m, M_m[g][2t..2t+1] in register m.
QF_DEV void ldmatrix_x4(u32* r, const u16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)));
}

// As ldmatrix_x4, transposed: each lane receives (M_m[2t][g], M_m[2t + 1][g]) in register m.
QF_DEV void ldmatrix_x4_trans(u32* r, const u16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)));
}

// Two f32 to bf16 (round to nearest even), `lo` in the low half.
QF_DEV u32 pack_bf16(float lo, float hi) {
  u32 out;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
  return out;
}

QF_DEV float qf_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

QF_DEV float qf_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 16 bytes from global to shared memory without passing through registers; zeros when
// `valid` is false (src-size 0: nothing is read).
QF_DEV void copy_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0));
}
QF_DEV void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits for this thread's copies; a block barrier after it makes everyone's visible.
QF_DEV void copy_async_wait() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
#define QF_CHECK_SHARED(end) ((void)0)

QF_DEV float shfl_xor(float x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }
QF_DEV bool warp_all(bool predicate) { return __all_sync(0xffffffffu, predicate); }
QF_DEV float bf16_to_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }
QF_DEV u16 f32_to_bf16(float x) { return (u16)(pack_bf16(x, 0.0f) & 0xffffu); }
// at[0] += x, at[1] += y, atomically (one vector reduction on sm_90 and newer).
QF_DEV void atomic_add2(float* at, float x, float y) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(at), "f"(x), "f"(y) : "memory");
#else
  atomicAdd(at, x);
  atomicAdd(at + 1, y);
#endif
}
#define QF_SYNC_BLOCK() __syncthreads()
#endif

#define QF_INF __int_as_float(0x7f800000)
#define QF_LN2 0.6931471805599453f
#define QF_LOG2E 1.4426950408889634f

// 16 bytes, for copying 8 bf16 at once.
struct __align__(16) QfVec {
  u32 x, y, z, w;
};

// The forward pass's arguments (mirrored by `ForwardArgs` in mod.rs, field for field).
struct QfForward {
  const u16* q;      // [batch, heads, seq, D], strided, rows contiguous
  const u16* k;      // [batch, kv_heads, seq, D], strided
  const u16* v;      // as k
  const int* qseg;   // [batch, seq], strided
  const int* kseg;   // [batch, seq], strided
  u16* out;          // [batch, seq, heads, D], contiguous: the output projection's layout
  float* lse;        // [batch, heads, seq], contiguous: natural log, +inf where no key is seen
  long long q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h, v_s, qseg_b, qseg_s, kseg_b, kseg_s;
  int seq, heads, kv_heads;
  float scale_log2;  // 1 / sqrt(D) * log2(e)
};

// The backward pass's arguments (`BackwardArgs` in mod.rs).
struct QfBackward {
  const u16* q;
  const u16* k;
  const u16* v;
  const int* qseg;
  const int* kseg;
  const u16* dout;     // [batch, heads, seq, D], strided
  const float* lse;    // [batch, heads, seq], contiguous, from the forward pass
  const float* delta;  // [batch, heads, seq], contiguous: rowsum(dO * O)
  float* dq;           // [batch, heads, seq, D], contiguous f32, zeroed: accumulated atomically
  float* dk;           // [batch, kv_heads, seq, D], contiguous f32, zeroed: accumulated atomically
  float* dv;           // as dk
  long long q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h, v_s, qseg_b, qseg_s, kseg_b, kseg_s;
  long long do_b, do_h, do_s;
  int seq, heads, kv_heads;
  float scale_log2;
  float scale;
  int pad;
};

// `D = rowsum(dO * O)` (`DeltaArgs` in mod.rs).
struct QfDelta {
  const u16* out;   // [batch, heads, seq, D], strided
  const u16* dout;  // [batch, heads, seq, D], strided
  float* delta;     // [batch, heads, seq], contiguous
  long long o_b, o_h, o_s, do_b, do_h, do_s;
  int seq, heads, rows;
  int pad;
};

// Copies ROWS rows of D bf16 from global memory (row `r` at src + r * stride) into shared
// memory with row pitch `ld`, zeros past `valid` rows. Every thread of the block takes part,
// each copying 16 bytes at a time: rows r0, r0 + 128 / (D / 8), ... at its column, with the
// count known at compile time (no loop and no division per copy).
template <int D, int ROWS>
QF_DEV void load_rows(u16* dst, int ld, const u16* src, long long stride, int valid) {
  constexpr int PER_ROW = D / 8, STRIDE_ROWS = 128 / PER_ROW;
  static_assert(ROWS % STRIDE_ROWS == 0, "whole rounds of the block's 128 threads");
  const int r0 = threadIdx.x / PER_ROW, c = (threadIdx.x % PER_ROW) * 8;
  src += r0 * stride + c;
  dst += r0 * ld + c;
  #pragma unroll
  for (int round = 0; round < ROWS / STRIDE_ROWS; round++) {
    QfVec value = {0u, 0u, 0u, 0u};
    if (r0 + round * STRIDE_ROWS < valid) value = *(const QfVec*)src;
    *(QfVec*)dst = value;
    src += STRIDE_ROWS * stride;
    dst += STRIDE_ROWS * ld;
  }
}

// As `load_rows`, but with asynchronous copies: the caller commits, waits and synchronises.
template <int D, int ROWS>
QF_DEV void copy_rows_async(u16* dst, int ld, const u16* src, long long stride, int valid) {
  constexpr int PER_ROW = D / 8, STRIDE_ROWS = 128 / PER_ROW;
  static_assert(ROWS % STRIDE_ROWS == 0, "whole rounds of the block's 128 threads");
  const int r0 = threadIdx.x / PER_ROW, c = (threadIdx.x % PER_ROW) * 8;
  const u16* row = src + r0 * stride + c;
  dst += r0 * ld + c;
  #pragma unroll
  for (int round = 0; round < ROWS / STRIDE_ROWS; round++) {
    bool in = r0 + round * STRIDE_ROWS < valid;
    copy_async16(dst, in ? row : src, in);
    row += STRIDE_ROWS * stride;
    dst += STRIDE_ROWS * ld;
  }
}

// The segment that each of the `count` rows from `first` carries (row r's at seg[r * stride]),
// or 0 where they differ or some lie past `seq`. Called by a whole warp. Two row ranges of one
// common segment need no mask between them beyond causality.
QF_DEV int common_segment(const int* seg, long long stride, int first, int count, int seq) {
  int common = first < seq ? seg[first * stride] : 0;
  bool same = true;
  for (int r = threadIdx.x & 31; r < count; r += 32)
    same = same && first + r < seq && seg[(first + r) * stride] == common;
  return warp_all(same) ? common : 0;
}

// The A fragment of the 16x16 block at (row0, col0) of a row-major bf16 matrix in shared
// memory: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
// (rows 8-15, cols 8-15) are a0..a3.
QF_DEV void load_a(u32* a, const u16* m, int ld, int row0, int col0) {
  int lane = threadIdx.x & 31, quarter = lane >> 3;
  ldmatrix_x4(a, m + (row0 + (lane & 7) + 8 * (quarter & 1)) * ld + col0 + 8 * (quarter >> 1));
}

// The A fragment of the 16x16 block at (row0, col0) of A = M^T, M row-major [col][row] in
// shared memory: a0 = A[g][2t..] = (M[col0 + 2t][row0 + g], M[col0 + 2t + 1][row0 + g]), and
// so on; each 8x8 block of A is the transposed one of M.
QF_DEV void load_a_of_transposed(u32* a, const u16* m, int ld, int row0, int col0) {
  int lane = threadIdx.x & 31, quarter = lane >> 3;
  // Matrix q of the fragment: A rows 8 (q & 1).., A columns 8 (q >> 1)..: M rows col0 + 8 (q >> 1)
  // + i, M columns row0 + 8 (q & 1).
  ldmatrix_x4_trans(a, m + (col0 + 8 * (quarter >> 1) + (lane & 7)) * ld + row0 + 8 * (quarter & 1));
}

// The B fragments of two 16x8 blocks of B = M^T, at (k0, n0) and (k0, n0 + 8), M row-major
// [n][k] in shared memory: b0 = M[n0 + g][k0 + 2t..], b1 = M[n0 + g][k0 + 8 + 2t..], and the
// same 8 rows further for the second.
QF_DEV void load_b2_of_transposed(u32* b, u32* next, const u16* m, int ld, int n0, int k0) {
  int lane = threadIdx.x & 31, quarter = lane >> 3;
  u32 r[4];
  ldmatrix_x4(r, m + (n0 + (lane & 7) + 8 * (quarter >> 1)) * ld + k0 + 8 * (quarter & 1));
  b[0] = r[0];
  b[1] = r[1];
  next[0] = r[2];
  next[1] = r[3];
}

// The B fragments at (k0, n0) and (k0, n0 + 8) of a row-major [k][n] matrix in shared memory:
// matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7) are b, the same 8 columns further next.
QF_DEV void load_b2(u32* b, u32* next, const u16* m, int ld, int k0, int n0) {
  int lane = threadIdx.x & 31, quarter = lane >> 3;
  u32 r[4];
  ldmatrix_x4_trans(r, m + (k0 + (lane & 7) + 8 * (quarter & 1)) * ld + n0 + 8 * (quarter >> 1));
  b[0] = r[0];
  b[1] = r[1];
  next[0] = r[2];
  next[1] = r[3];
}

// Two C tiles (keys 16kb..16kb+15 of a score row block) as one A fragment of bf16.
QF_DEV void c_pair_to_a(u32* a, const float* left, const float* right) {
  a[0] = pack_bf16(left[0], left[1]);
  a[1] = pack_bf16(left[2], left[3]);
  a[2] = pack_bf16(right[0], right[1]);
  a[3] = pack_bf16(right[2], right[3]);
}

// ---------------------------------------------------------------------------------------------
// Forward: a block of 64 queries of one head (4 warps of 16 rows) walks the key tiles of 64 up
// to its last query, with the running maximum and sum of each row (online softmax).
// ---------------------------------------------------------------------------------------------
template <int D>
QF_DEV void forward(const QfForward& p) {
  constexpr int BR = 64, BC = 64, LD = D + 8;
  QF_DECLARE_SMEM(smem);
  // K, V and the keys' segments twice: the next tile is copied while this one is used.
  u16* q_tile = (u16*)smem;               // [BR][LD]
  u16* k_tiles = q_tile + BR * LD;        // [2][BC][LD]
  u16* v_tiles = k_tiles + 2 * BC * LD;   // [2][BC][LD]
  int* key_segs = (int*)(v_tiles + 2 * BC * LD);  // [2][BC]
  int* key_tile_seg = key_segs + 2 * BC;          // [2]: the tile's common segment, or 0
  QF_CHECK_SHARED(key_tile_seg + 2);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // The last query blocks see the most keys: start them first.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
  const int h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (p.heads / p.kv_heads);
  const u16* q = p.q + b * p.q_b + h * p.q_h;
  const u16* k = p.k + b * p.k_b + kvh * p.k_h;
  const u16* v = p.v + b * p.v_b + kvh * p.v_h;

  load_rows<D, BR>(q_tile, LD, q + q0 * p.q_s, p.q_s, p.seq - q0);
  // This thread's two rows: g and g + 8 of the warp's 16.
  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  int seg[2];
  #pragma unroll
  for (int i = 0; i < 2; i++) seg[i] = row[i] < p.seq ? p.qseg[b * p.qseg_b + row[i] * p.qseg_s] : 0;
  const int warp_seg = common_segment(p.qseg + b * p.qseg_b, p.qseg_s, q0 + warp * 16, 16, p.seq);
  QF_SYNC_BLOCK();
  u32 qa[D / 16][4];
  #pragma unroll
  for (int kk = 0; kk < D / 16; kk++) load_a(qa[kk], q_tile, LD, warp * 16, kk * 16);

  float o[D / 8][4];
  #pragma unroll
  for (int j = 0; j < D / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  // Each row's running maximum of the unscaled scores and sum of exp2(scale_log2 (s - m)).
  float m[2] = {-QF_INF, -QF_INF}, l[2] = {0.0f, 0.0f};
  const int last_query = (q0 + BR < p.seq ? q0 + BR : p.seq) - 1;
  // Starts the copy of the key tile at `k0` into buffer `buf`.
  auto fetch = [&](int k0, int buf) {
    copy_rows_async<D, BC>(k_tiles + buf * BC * LD, LD, k + k0 * p.k_s, p.k_s, p.seq - k0);
    copy_rows_async<D, BC>(v_tiles + buf * BC * LD, LD, v + k0 * p.v_s, p.v_s, p.seq - k0);
    copy_async_commit();
    int key = k0 + (int)threadIdx.x;
    if (threadIdx.x < BC)
      key_segs[buf * BC + threadIdx.x] = key < p.seq ? p.kseg[b * p.kseg_b + key * p.kseg_s] : 0;
    if (warp == 0) {
      int common = common_segment(p.kseg + b * p.kseg_b, p.kseg_s, k0, BC, p.seq);
      if (lane == 0) key_tile_seg[buf] = common;
    }
  };
  fetch(0, 0);

  for (int k0 = 0, buf = 0; k0 <= last_query; k0 += BC, buf ^= 1) {
    copy_async_wait();
    // This tile has landed for everyone, and every warp is done with the previous one, whose
    // buffer the next copy reuses.
    QF_SYNC_BLOCK();
    if (k0 + BC <= last_query) fetch(k0 + BC, buf ^ 1);
    const u16* k_tile = k_tiles + buf * BC * LD;
    const u16* v_tile = v_tiles + buf * BC * LD;
    const int* key_seg = key_segs + buf * BC;
    if (k0 > q0 + warp * 16 + 15) continue;  // every key of the tile is after the warp's rows

    // S = Q K^T for the warp's 16 rows: 8 tiles of 16x8.
    float s[8][4];
    #pragma unroll
    for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    #pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      #pragma unroll
      for (int n = 0; n < 8; n += 2) {
        u32 kb[2], kb_next[2];
        load_b2_of_transposed(kb, kb_next, k_tile, LD, n * 8, kk * 16);
        mma_bf16(s[n], qa[kk], kb);
        mma_bf16(s[n + 1], qa[kk], kb_next);
      }
    }
    // Mask, then the rows' new maxima over the 4 lanes of a row, in unscaled scores (the scale
    // is positive: it joins the exponent below, one FFMA per score). A tile wholly before the
    // warp's rows, in their one segment, needs no mask.
    const bool unmasked = warp_seg != 0 && key_tile_seg[buf] == warp_seg &&
                          k0 + BC - 1 <= q0 + warp * 16;
    float tile_max[2] = {-QF_INF, -QF_INF};
    // Inlined twice, once per constant `masked`: the common, unmasked tiles run no mask code.
    auto mask_and_max = [&](bool masked) {
      #pragma unroll
      for (int n = 0; n < 8; n++) {
        #pragma unroll
        for (int e = 0; e < 4; e++) {
          int i = e >> 1, col = n * 8 + 2 * t + (e & 1), key = k0 + col;
          if (masked) {
            int ks = key_seg[col];
            bool seen = (key <= row[i]) & (ks != 0) & (ks == seg[i]);  // no branch per element
            s[n][e] = seen ? s[n][e] : -QF_INF;
          }
          tile_max[i] = fmaxf(tile_max[i], s[n][e]);  // one FMNMX (no NaN reaches it)
        }
      }
    };
    if (unmasked) mask_and_max(false);
    else mask_and_max(true);
    float alpha[2];
    #pragma unroll
    for (int i = 0; i < 2; i++) {
      float mx = tile_max[i];
      float other = shfl_xor(mx, 1);
      mx = fmaxf(mx, other);
      other = shfl_xor(mx, 2);
      mx = fmaxf(mx, other);
      float new_max = fmaxf(mx, m[i]);
      // A row that has seen no key yet keeps o = 0 and l = 0, and its p are 0.
      alpha[i] = new_max == -QF_INF ? 1.0f : qf_exp2((m[i] - new_max) * p.scale_log2);
      m[i] = new_max;
    }
    // p = exp2(scale_log2 (s - m)), as one FFMA and the exponential.
    float base[2] = {m[0] == -QF_INF ? 0.0f : m[0] * p.scale_log2,
                     m[1] == -QF_INF ? 0.0f : m[1] * p.scale_log2};
    float sum[2] = {0.0f, 0.0f};
    #pragma unroll
    for (int n = 0; n < 8; n++) {
      #pragma unroll
      for (int e = 0; e < 4; e++) {
        int i = e >> 1;
        s[n][e] = qf_exp2(s[n][e] * p.scale_log2 - base[i]);
        sum[i] += s[n][e];
      }
    }
    // Each lane keeps the sum over its own columns; the 4 lanes of a row add up at the end.
    #pragma unroll
    for (int i = 0; i < 2; i++) l[i] = l[i] * alpha[i] + sum[i];
    #pragma unroll
    for (int j = 0; j < D / 8; j++) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }
    // O += P V, P in bf16 straight from the score registers.
    #pragma unroll
    for (int kb = 0; kb < BC / 16; kb++) {
      u32 pa[4];
      c_pair_to_a(pa, s[2 * kb], s[2 * kb + 1]);
      #pragma unroll
      for (int j = 0; j < D / 8; j += 2) {
        u32 vb[2], vb_next[2];
        load_b2(vb, vb_next, v_tile, LD, kb * 16, j * 8);
        mma_bf16(o[j], pa, vb);
        mma_bf16(o[j + 1], pa, vb_next);
      }
    }
  }

  #pragma unroll
  for (int i = 0; i < 2; i++) {
    l[i] += shfl_xor(l[i], 1);
    l[i] += shfl_xor(l[i], 2);
  }
  #pragma unroll
  for (int i = 0; i < 2; i++) {
    if (row[i] >= p.seq) continue;
    long long at = ((long long)(b * p.heads + h) * p.seq + row[i]);
    long long out_at = ((long long)b * p.seq + row[i]) * p.heads + h;
    float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    #pragma unroll
    for (int j = 0; j < D / 8; j++)
      *(u32*)(p.out + out_at * D + j * 8 + 2 * t) = pack_bf16(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
    if (t == 0) p.lse[at] = l[i] > 0.0f ? (m[i] * p.scale_log2 + qf_log2(l[i])) * QF_LN2 : QF_INF;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: a block of 64 keys and one query head (4 warps of 16 keys) walks the query tiles
// of BR that can see the keys. dK and dV of the head accumulate in registers and are added
// atomically (f32) to the kv head's, as dQ is per tile: a block per query head rather than per
// kv head gives the GPU n_rep times the blocks (ncu: 512 blocks at 12% occupancy for 0.5b).
//   S^T = K Q^T, P^T = exp(S^T scale - lse), dP^T = V dO^T, dS^T = P^T (dP^T - D)
//   dV += P^T dO, dK += dS^T Q (scaled at the end), dQ += scale dS K
// ---------------------------------------------------------------------------------------------
template <int D>
QF_DEV void backward(const QfBackward& p) {
  constexpr int BC = 64, BR = D > 64 ? 32 : 64, LD = D + 8, LDS = BR + 8;
  // dQ of a query tile: BR / 16 row groups, the columns split among the remaining warps.
  constexpr int ROW_GROUPS = BR / 16, PARTS = 4 / ROW_GROUPS, DQ_COLS = D / PARTS;
  QF_DECLARE_SMEM(smem);
  // q, dO and their rows' lse, D and segments twice: the next (head, query tile) is copied
  // while this one is used.
  u16* k_tile = (u16*)smem;               // [BC][LD]
  u16* v_tile = k_tile + BC * LD;         // [BC][LD]
  u16* ds_tile = v_tile + BC * LD;        // [BC][LDS]: dS^T, key-major
  u16* q_tiles = ds_tile + BC * LDS;      // [2][BR][LD]
  u16* do_tiles = q_tiles + 2 * BR * LD;  // [2][BR][LD]
  float* lse2s = (float*)(do_tiles + 2 * BR * LD);  // [2][BR]: lse in log2 units
  float* deltas = lse2s + 2 * BR;                    // [2][BR]
  int* query_segs = (int*)(deltas + 2 * BR);         // [2][BR]
  int* query_tile_seg = query_segs + 2 * BR;         // [2]: the tile's common segment, or 0
  QF_CHECK_SHARED(query_tile_seg + 2);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int k0 = blockIdx.x * BC, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (p.heads / p.kv_heads);
  const u16* k = p.k + b * p.k_b + kvh * p.k_h;
  const u16* v = p.v + b * p.v_b + kvh * p.v_h;
  load_rows<D, BC>(k_tile, LD, k + k0 * p.k_s, p.k_s, p.seq - k0);
  load_rows<D, BC>(v_tile, LD, v + k0 * p.v_s, p.v_s, p.seq - k0);
  // This thread's two keys: rows g and g + 8 of the warp's 16.
  const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  int kseg[2];
  #pragma unroll
  for (int i = 0; i < 2; i++) kseg[i] = key[i] < p.seq ? p.kseg[b * p.kseg_b + key[i] * p.kseg_s] : 0;
  const int warp_seg = common_segment(p.kseg + b * p.kseg_b, p.kseg_s, k0 + warp * 16, 16, p.seq);

  // At head size 64 the warp's K and V rows stay in registers as A fragments for the whole
  // walk (at 128 they would spill: read from shared memory per query tile instead).
  constexpr bool HOLD_KV = D == 64;
  u32 kv_held[HOLD_KV ? D / 16 : 1][2][4];
  if (HOLD_KV) {
    QF_SYNC_BLOCK();
    #pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      load_a(kv_held[kk][0], k_tile, LD, warp * 16, kk * 16);
      load_a(kv_held[kk][1], v_tile, LD, warp * 16, kk * 16);
    }
  }

  float dk[D / 8][4], dv[D / 8][4];
  #pragma unroll
  for (int j = 0; j < D / 8; j++)
    #pragma unroll
    for (int e = 0; e < 4; e++) dk[j][e] = dv[j][e] = 0.0f;

  const int rg = warp % ROW_GROUPS, part = warp / ROW_GROUPS;
  // The query tiles that may see these keys start at the one holding key k0 (causal).
  const int first_q0 = (k0 / BR) * BR, tiles = (p.seq - first_q0 + BR - 1) / BR;
  const long long head_row = (long long)(b * p.heads + h) * p.seq;
  // Starts the copies of query tile `it` into buffer `buf`.
  auto fetch = [&](int it, int buf) {
    int q0 = first_q0 + it * BR;
    copy_rows_async<D, BR>(q_tiles + buf * BR * LD, LD,
                           p.q + b * p.q_b + h * p.q_h + q0 * p.q_s, p.q_s, p.seq - q0);
    copy_rows_async<D, BR>(do_tiles + buf * BR * LD, LD,
                           p.dout + b * p.do_b + h * p.do_h + q0 * p.do_s, p.do_s, p.seq - q0);
    copy_async_commit();
    if (threadIdx.x < BR) {
      int qi = q0 + threadIdx.x;
      bool valid = qi < p.seq;
      lse2s[buf * BR + threadIdx.x] = valid ? p.lse[head_row + qi] * QF_LOG2E : QF_INF;
      deltas[buf * BR + threadIdx.x] = valid ? p.delta[head_row + qi] : 0.0f;
      query_segs[buf * BR + threadIdx.x] = valid ? p.qseg[b * p.qseg_b + qi * p.qseg_s] : 0;
    }
    if (warp == 0) {
      int common = common_segment(p.qseg + b * p.qseg_b, p.qseg_s, q0, BR, p.seq);
      if (lane == 0) query_tile_seg[buf] = common;
    }
  };
  fetch(0, 0);
  for (int it = 0, buf = 0; it < tiles; it++, buf ^= 1) {
    const int q0 = first_q0 + it * BR;
    copy_async_wait();
    // This iteration's tiles have landed for everyone, and every warp is done with the
    // previous iteration (its buffers, which the next copy reuses, and dS).
    QF_SYNC_BLOCK();
    if (it + 1 < tiles) fetch(it + 1, buf ^ 1);
    const u16* q_tile = q_tiles + buf * BR * LD;
    const u16* do_tile = do_tiles + buf * BR * LD;
    const float* lse2 = lse2s + buf * BR;
    const float* delta = deltas + buf * BR;
    const int* query_seg = query_segs + buf * BR;
    {
      // S^T and dP^T for the warp's 16 keys against the BR queries.
      float st[BR / 8][4], dpt[BR / 8][4];
      #pragma unroll
      for (int n = 0; n < BR / 8; n++)
        #pragma unroll
        for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.0f;
      #pragma unroll
      for (int kk = 0; kk < D / 16; kk++) {
        u32 ka[4], va[4];
        if (HOLD_KV) {
          #pragma unroll
          for (int r = 0; r < 4; r++) {
            ka[r] = kv_held[HOLD_KV ? kk : 0][0][r];
            va[r] = kv_held[HOLD_KV ? kk : 0][1][r];
          }
        } else {
          load_a(ka, k_tile, LD, warp * 16, kk * 16);
          load_a(va, v_tile, LD, warp * 16, kk * 16);
        }
        #pragma unroll
        for (int n = 0; n < BR / 8; n += 2) {
          u32 qb[2], qb_next[2], dob[2], dob_next[2];
          load_b2_of_transposed(qb, qb_next, q_tile, LD, n * 8, kk * 16);
          load_b2_of_transposed(dob, dob_next, do_tile, LD, n * 8, kk * 16);
          mma_bf16(st[n], ka, qb);
          mma_bf16(st[n + 1], ka, qb_next);
          mma_bf16(dpt[n], va, dob);
          mma_bf16(dpt[n + 1], va, dob_next);
        }
      }
      // P^T and dS^T in place; dS^T (bf16) to shared memory for dQ, two queries per store. A
      // tile wholly after the warp's keys, in their one segment, needs no mask.
      const bool unmasked = warp_seg != 0 && query_tile_seg[buf] == warp_seg &&
                            q0 >= k0 + warp * 16 + 15;
      // Inlined twice, once per constant `masked`: the common, unmasked tiles run no mask code.
      auto probabilities = [&](bool masked) {
        #pragma unroll
        for (int n = 0; n < BR / 8; n++) {
          #pragma unroll
          for (int e = 0; e < 4; e++) {
            int i = e >> 1, col = n * 8 + 2 * t + (e & 1), query = q0 + col;
            float x = st[n][e] * p.scale_log2 - lse2[col];
            if (masked) {
              int qs = query_seg[col];
              bool seen = (key[i] <= query) & (kseg[i] != 0) & (kseg[i] == qs);
              x = seen ? x : -QF_INF;  // exp2(-inf) = 0, with no branch per element
            }
            float prob = qf_exp2(x);
            float ds = prob * (dpt[n][e] - delta[col]);
            st[n][e] = prob;
            dpt[n][e] = ds;
          }
          #pragma unroll
          for (int i = 0; i < 2; i++)
            *(u32*)(ds_tile + (warp * 16 + g + 8 * i) * LDS + n * 8 + 2 * t) =
                pack_bf16(dpt[n][2 * i], dpt[n][2 * i + 1]);
        }
      };
      if (unmasked) probabilities(false);
      else probabilities(true);
      // dV += P^T dO and dK += dS^T Q, the A operands straight from the registers.
      #pragma unroll
      for (int kb = 0; kb < BR / 16; kb++) {
        u32 pa[4], dsa[4];
        c_pair_to_a(pa, st[2 * kb], st[2 * kb + 1]);
        c_pair_to_a(dsa, dpt[2 * kb], dpt[2 * kb + 1]);
        #pragma unroll
        for (int j = 0; j < D / 8; j += 2) {
          u32 dob[2], dob_next[2], qb[2], qb_next[2];
          load_b2(dob, dob_next, do_tile, LD, kb * 16, j * 8);
          load_b2(qb, qb_next, q_tile, LD, kb * 16, j * 8);
          mma_bf16(dv[j], pa, dob);
          mma_bf16(dv[j + 1], pa, dob_next);
          mma_bf16(dk[j], dsa, qb);
          mma_bf16(dk[j + 1], dsa, qb_next);
        }
      }
      QF_SYNC_BLOCK();  // dS is complete

      // dQ rows 16 rg.. of the tile, columns part * DQ_COLS..: dS [16 x BC] K [BC x DQ_COLS].
      float dq[DQ_COLS / 8][4];
      #pragma unroll
      for (int j = 0; j < DQ_COLS / 8; j++) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;
      #pragma unroll
      for (int kb = 0; kb < BC / 16; kb++) {
        u32 dsa[4];
        load_a_of_transposed(dsa, ds_tile, LDS, rg * 16, kb * 16);
        #pragma unroll
        for (int j = 0; j < DQ_COLS / 8; j += 2) {
          u32 kbf[2], kbf_next[2];
          load_b2(kbf, kbf_next, k_tile, LD, kb * 16, part * DQ_COLS + j * 8);
          mma_bf16(dq[j], dsa, kbf);
          mma_bf16(dq[j + 1], dsa, kbf_next);
        }
      }
      #pragma unroll
      for (int i = 0; i < 2; i++) {
        int query = q0 + rg * 16 + g + 8 * i;
        if (query >= p.seq) continue;
        float* at = p.dq + (head_row + query) * D + part * DQ_COLS + 2 * t;
        #pragma unroll
        for (int j = 0; j < DQ_COLS / 8; j++)
          atomic_add2(at + j * 8, dq[j][2 * i] * p.scale, dq[j][2 * i + 1] * p.scale);
      }
    }
  }

  #pragma unroll
  for (int i = 0; i < 2; i++) {
    if (key[i] >= p.seq) continue;
    long long at = ((long long)(b * p.kv_heads + kvh) * p.seq + key[i]) * D + 2 * t;
    #pragma unroll
    for (int j = 0; j < D / 8; j++) {
      atomic_add2(p.dk + at + j * 8, dk[j][2 * i] * p.scale, dk[j][2 * i + 1] * p.scale);
      atomic_add2(p.dv + at + j * 8, dv[j][2 * i], dv[j][2 * i + 1]);
    }
  }
}

// delta = rowsum(dO * O) in f32 from the bf16 values: D / 8 threads per row, each taking 8
// consecutive elements (16-byte loads, so a warp reads whole rows), summed across them.
template <int D>
QF_DEV void row_delta(const QfDelta& p) {
  constexpr int PER_ROW = D / 8, ROWS = 128 / PER_ROW;
  int row = blockIdx.x * ROWS + threadIdx.x / PER_ROW, c = (threadIdx.x % PER_ROW) * 8;
  bool valid = row < p.rows;
  float sum = 0.0f;
  if (valid) {
    int s = row % p.seq, bh = row / p.seq, h = bh % p.heads, b = bh / p.heads;
    QfVec o = *(const QfVec*)(p.out + b * p.o_b + h * p.o_h + s * p.o_s + c);
    QfVec d = *(const QfVec*)(p.dout + b * p.do_b + h * p.do_h + s * p.do_s + c);
    const u32 ow[4] = {o.x, o.y, o.z, o.w}, dw[4] = {d.x, d.y, d.z, d.w};
    #pragma unroll
    for (int i = 0; i < 4; i++)
      sum += bf16_to_f32((u16)(ow[i] & 0xffffu)) * bf16_to_f32((u16)(dw[i] & 0xffffu)) +
             bf16_to_f32((u16)(ow[i] >> 16)) * bf16_to_f32((u16)(dw[i] >> 16));
  }
  // Every lane takes part in the shuffles; a row's lanes are aligned groups of PER_ROW.
  #pragma unroll
  for (int mask = 1; mask < PER_ROW; mask <<= 1) sum += shfl_xor(sum, mask);
  if (valid && c == 0) p.delta[row] = sum;
}

QF_KERNEL qfbase_forward_64(const QfForward p) { forward<64>(p); }
QF_KERNEL qfbase_forward_128(const QfForward p) { forward<128>(p); }
QF_KERNEL qfbase_backward_64(const QfBackward p) { backward<64>(p); }
QF_KERNEL qfbase_backward_128(const QfBackward p) { backward<128>(p); }
QF_KERNEL qfbase_delta_64(const QfDelta p) { row_delta<64>(p); }
QF_KERNEL qfbase_delta_128(const QfDelta p) { row_delta<128>(p); }
