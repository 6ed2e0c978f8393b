// Panel layout. The step's gathers read rows of W [n, d] (decode) and of the per-token rows
// (weight gradients) at random. Whole rows come from L3 at ~6 GB/s per core here; a 16-column slice
// of every row (a panel) fits in one core's 1 MiB L2, so the decoder and the weight gradients walk
// the columns one panel at a time, all tokens (or latents) inside: every gathered line then comes
// from L2.
// A matrix [N, d] packed into panels is [P, N, 16], P = ceil(d / 16), zero-padded on the right;
// zeros add nothing to sums and dot products, so padded columns need no special case until a
// result is written back row-major.
#pragma once

#include <unistd.h>

#include "common.h"

// P, the panels of a matrix with d columns.
static inline int64_t panels(int64_t d) { return (d + VL - 1) / VL; }

// The w = min(16, d - col) leading lanes of row-major src, zeros after (the last panel is partial).
static inline vf load_cols(const float* src, int64_t w) {
  if (w == VL) return vload(src);
#ifdef __AVX512F__
  return (vf)_mm512_maskz_loadu_ps(__mmask16((1u << w) - 1), src);
#else
  vf v = vbcast(0.f);
  for (int64_t t = 0; t < w; ++t) v[t] = src[t];
  return v;
#endif
}

// Writes the w = min(16, d - col) leading lanes of v to row-major dst (the last panel is partial).
static inline void store_cols(float* dst, vf v, int64_t w) {
  if (w == VL) {
    vstore(dst, v);
  } else {
    for (int64_t t = 0; t < w; ++t) dst[t] = v[t];
  }
}

// Whether two panels of a matrix with n rows (W's, or the token slots `weight_grads` reads) stay
// in L2 beside the streams (5/8 of it; 1 MiB when the size is unknown). Past that the panel
// path's single-line gathers come from L3.
inline bool panels_fit_l2(int64_t n) {
  long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 <= 0) l2 = 1 << 20;
  return 2 * n * VL * int64_t(sizeof(float)) <= int64_t(l2) * 5 / 8;
}
