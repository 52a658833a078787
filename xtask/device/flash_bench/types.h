// The kernels' argument structs, as in flash.cu (and baseline_flash.cu: the same layouts), for
// the host side of the bench, which includes neither.
#pragma once
typedef unsigned short u16;
struct QfForward {
  const u16* q; const u16* k; const u16* v; const int* qseg; const int* kseg;
  u16* out; float* lse;
  long long q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h, v_s, qseg_b, qseg_s, kseg_b, kseg_s;
  int seq, heads, kv_heads;
  float scale_log2;
};
struct QfBackward {
  const u16* q; const u16* k; const u16* v; const int* qseg; const int* kseg; const u16* dout;
  const float* lse; const float* delta; float* dq; float* dk; float* dv;
  long long q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h, v_s, qseg_b, qseg_s, kseg_b, kseg_s;
  long long do_b, do_h, do_s;
  int seq, heads, kv_heads;
  float scale_log2;
  float scale;
  int pad;
};
struct QfDelta {
  const u16* out; const u16* dout; float* delta;
  long long o_b, o_h, o_s, do_b, do_h, do_s;
  int seq, heads, rows;
  int pad;
};
