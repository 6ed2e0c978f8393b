"""Native CPU kernels for the sparse step, compiled on first use (torch cpp_extension + OpenMP).

Each kernel is O(work actually needed): a row-wise top-k that filters each row against a
threshold (the previous row's, or one from its block maxima), and the B K d gathers and
scatters of the sparse decoder and encoder backward, fused into one token-major pass
(`decode_forward`) and one latent-major pass (`weight_grads`), and the unit-norm decoder's
optimiser step as one pass over its rows (`adam_unit_rows`). Past the GEMM the step is bound
by where its gathered rows come from, not by arithmetic: whole rows of a 10 MB matrix come
from L3 at ~6 GB/s per core here, single lines of a 0.6 MB one from L2 at ~35 GB/s. So both
passes walk the columns in panels of 16 (one cache line per row) with every token or latent
inside, and a panel of the gathered matrix stays in L2; a decoder whose panels do not fit
falls back to gathering whole rows. All kernels are deterministic: every output element is
written by one thread in a fixed order, independent of the thread count.

`load()` returns the compiled module, or None when no compiler is available or
SAEFLOW_NATIVE_KERNELS=0; callers then use stock torch ops (same results to rounding).
The first call compiles (~1 min here); build ahead of time with
`python -c "from sae_core.sae import native; native.load()"`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>
#include <unistd.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

// Rows per task so each task does >= ~64k operations: small problems run inline on one
// thread instead of paying for (and, on a busy machine, waiting at) a parallel region.
static inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_item));
}

// 16 floats, unaligned loads and stores allowed: GCC/Clang emit AVX-512 (two AVX2 halves, or
// NEON quarters, elsewhere). The d-length loops below keep their sums in these registers.
typedef float vf __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t VL = 16;
static inline vf vload(const float* p) { return *(const vf*)p; }
static inline void vstore(float* p, vf v) { *(vf*)p = v; }
// A whole 64-byte line written for a later pass, not for this one: a streaming store skips the
// read for ownership and leaves the caches to the data being gathered. p: 64-byte aligned.
// `stream_fence` then orders these stores before the thread's work is handed on.
static inline void vstream(float* p, vf v) {
#ifdef __AVX512F__
  _mm512_stream_ps(p, (__m512)v);
#else
  vstore(p, v);
#endif
}
static inline void stream_fence() {
#ifdef __AVX512F__
  _mm_sfence();
#endif
}
static inline vf vbcast(float s) { return vf{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
static inline float hsum(vf v) {
  float s = 0.f;
  for (int t = 0; t < VL; ++t) s += v[t];
  return s;
}
// Gathered rows come from L3 or memory: ask for the next ones while this one is summed.
static inline void prefetch_row(const float* p, int64_t d) {
  for (int64_t c = 0; c < d; c += VL) __builtin_prefetch(p + c);
}

// A pass that gathers lines of a panel in random order finds them in memory the first time
// (the GEMM's output has flushed L3 since they were written), one memory latency each, where
// lines asked for in order stream in. So each pass first asks for its panels' lines in order,
// into L2 (prefetcht1): in alternated training steps at n = 4,608 the decoder took 1.1 ms less
// and the weight gradients 1.6 ms less.
static inline void prefetch_lines_l2(const float* p, int64_t lines) {
  for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(p + l * VL, 0, 2);
}

// out = base + sum_i coef[i] * W[rows[i]] over d columns (base may be null: 0). Sums stay in
// registers 128 columns at a time, so each output element is written once.
static void gather_row(float* out, const float* base, const float* W, int64_t d, const int64_t* rows,
                       const float* coef, int64_t cnt) {
  int64_t c0 = 0;
  for (; c0 + 8 * VL <= d; c0 += 8 * VL) {
    vf acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = base ? vload(base + c0 + t * VL) : vbcast(0.f);
    for (int64_t i = 0; i < cnt; ++i) {
      const vf v = vbcast(coef[i]);
      const float* w = W + rows[i] * d + c0;
      for (int t = 0; t < 8; ++t) acc[t] += v * vload(w + t * VL);
    }
    for (int t = 0; t < 8; ++t) vstore(out + c0 + t * VL, acc[t]);
  }
  for (; c0 + VL <= d; c0 += VL) {
    vf acc = base ? vload(base + c0) : vbcast(0.f);
    for (int64_t i = 0; i < cnt; ++i) acc += vbcast(coef[i]) * vload(W + rows[i] * d + c0);
    vstore(out + c0, acc);
  }
  for (; c0 < d; ++c0) {
    float acc = base ? base[c0] : 0.f;
    for (int64_t i = 0; i < cnt; ++i) acc += coef[i] * W[rows[i] * d + c0];
    out[c0] = acc;
  }
}

static inline float dot(const float* a, const float* b, int64_t d) {
  vf s0 = vbcast(0.f), s1 = vbcast(0.f);
  int64_t c = 0;
  for (; c + 2 * VL <= d; c += 2 * VL) {
    s0 += vload(a + c) * vload(b + c);
    s1 += vload(a + c + VL) * vload(b + c + VL);
  }
  for (; c + VL <= d; c += VL) s0 += vload(a + c) * vload(b + c);
  float s = hsum(s0 + s1);
  for (; c < d; ++c) s += a[c] * b[c];
  return s;
}

// Top-k of rows of pre + bias: vals descending, ties to the lower index. Per row, a safe
// threshold from block maxima: the row is read as groups of G vectors, and a lane-wise max over
// each group gives 16 block maxima at once (block = the G entries of one lane). If at least k
// block maxima reach t, at least k entries do, so t is at most the row's k-th largest. The least
// of the maxima of k disjoint runs of blocks is such a t; a bisection over the nb block maxima
// (vector counts) raises it until about k of them reach it. One vector pass then keeps the
// entries that reach t (a few more than k, c of them), and their (value, index) keys are ranked
// (`top_keys`). ~n/16 vector ops + O(nb + c^2 / 8) per row.
struct TopkPlan {
  int64_t n, k, G, span, groups, tail0, nb;
  std::vector<int64_t> runs;  // k + 1 run bounds over the nb block maxima
  // The rank whose value is the next row's threshold guess (`topk_row`): 3k/2 while that many
  // keys are ranked without sorting (k <= 43); 0 (no guessing) above, where the sort's cost
  // grows with the candidates more than a second pass costs (measured at k = 128).
  int64_t guess_rank;
  TopkPlan(int64_t n_, int64_t k_) : n(n_), k(k_), guess_rank(k_ + k_ / 2 <= 64 ? k_ + k_ / 2 : 0) {
    // About 8k block maxima (a tight threshold) but no more than 32 entries per block; the last
    // n % (16 G) entries are blocks of one.
    G = std::max<int64_t>(1, std::min<int64_t>(32, n / (8 * k)));
    span = G * VL;
    groups = n / span;
    tail0 = groups * span;
    nb = groups * VL + (n - tail0);
    runs.resize(k + 1);
    for (int64_t r = 0; r <= k; ++r) runs[r] = r * nb / k;
  }
};

struct TopkScratch {
  std::vector<float> bmax, cv;
  std::vector<int64_t> ci;
  std::vector<uint64_t> keys;
  float guess = NAN;  // the previous row's value of rank guess_rank (see topk_row)
  explicit TopkScratch(const TopkPlan& p) : bmax(p.nb + VL), cv(p.n + VL), ci(p.n + VL), keys(p.n + 8) {}
};

// Order-preserving key: larger value first, then lower index (n < 2^32); -0 ranks as +0.
static inline uint64_t topk_key(float v, int64_t j) {
  uint32_t u;
  v = v == 0.f ? 0.f : v;
  std::memcpy(&u, &v, 4);
  u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;
  return (uint64_t(u) << 32) | (0xFFFFFFFFu - uint32_t(j));
}

// Leaves the k largest of the c unique keys in keys[0, k), descending, and returns the key of
// rank min(c, g) (1 = the largest; g >= k). Up to 64 keys (the usual case: the threshold passes
// a few more than k), each key's rank is the count of keys above it, 8 compares per vector
// instruction and no data-dependent branches: 2.6 ms less than nth_element + sort for a
// 4096 x 4608 top-32 here. keys has room for c rounded up to 8.
static inline uint64_t top_keys(uint64_t* keys, int64_t c, int64_t k, int64_t g) {
  const int64_t m = std::min(c, g);
#ifdef __AVX512F__
  if (c <= 64) {
    const int64_t nv = (c + 7) / 8;
    for (int64_t t = c; t < nv * 8; ++t) keys[t] = 0;  // below every key: ranks unchanged
    uint64_t ranked[64];
    for (int64_t t = 0; t < c; ++t) {
      const __m512i kt = _mm512_set1_epi64(int64_t(keys[t]));
      int rank = 0;
      for (int64_t v = 0; v < nv; ++v)
        rank += __builtin_popcount(_mm512_cmpgt_epu64_mask(_mm512_loadu_si512(keys + 8 * v), kt));
      ranked[rank] = keys[t];
    }
    std::memcpy(keys, ranked, k * sizeof(uint64_t));
    return ranked[m - 1];
  }
#endif
  if (c > m) std::nth_element(keys, keys + (m - 1), keys + c, std::greater<uint64_t>());
  const uint64_t at_m = keys[m - 1];
  if (m > k) std::nth_element(keys, keys + (k - 1), keys + m, std::greater<uint64_t>());
  std::sort(keys, keys + k, std::greater<uint64_t>());
  return at_m;
}

// How many of a[0, m) reach t (vector compares; m padded to whole vectors with -inf).
static inline int64_t count_ge(const float* a, int64_t m, float t) {
  typedef int32_t vi __attribute__((vector_size(64)));
  vi acc = {};
  const vf tv = vbcast(t);
  for (int64_t q = 0; q < m; q += VL) acc -= (vi)(vload(a + q) >= tv);
  int64_t c = 0;
  for (int i = 0; i < VL; ++i) c += acc[i];
  return c;
}

// The top-k reads its rows once, front to back, faster than the hardware prefetcher brings
// them here: each vector loaded asks for the line 4 KB ahead (rows are contiguous, so past a
// row's end comes the next row). Top-32 of 4096 x 4608: 7.3 -> 6.8 ms, of 4096 x 16384: 18.1 -> 16.9.
static inline void prefetch_ahead(const float* p) { __builtin_prefetch(p + 1024); }

// A threshold at most the row's k-th largest of p + bb, from its block maxima (see TopkPlan).
static inline __attribute__((always_inline)) float block_threshold(const TopkPlan& P, TopkScratch& s, const float* p,
                                                                  const float* bb) {
  const int64_t n = P.n, k = P.k, G = P.G, span = P.span, groups = P.groups, nb = P.nb;
  float* bmax = s.bmax.data();
  for (int64_t q = 0; q < groups; ++q) {
    const float *pg = p + q * span, *bg = bb + q * span;
    prefetch_ahead(pg);
    vf m = vload(pg) + vload(bg);
    for (int64_t v = 1; v < G; ++v) {
      prefetch_ahead(pg + v * VL);
      const vf w = vload(pg + v * VL) + vload(bg + v * VL);
      m = m > w ? m : w;
    }
    vstore(bmax + q * VL, m);
  }
  for (int64_t j = P.tail0; j < n; ++j) bmax[groups * VL + j - P.tail0] = p[j] + bb[j];
  const int64_t nbv = (nb + VL - 1) / VL * VL;
  for (int64_t q = nb; q < nbv; ++q) bmax[q] = -INFINITY;
  float lo = INFINITY, up = -INFINITY;
  for (int64_t r = 0; r < k; ++r) {
    float m = bmax[P.runs[r]];
    for (int64_t q = P.runs[r] + 1; q < P.runs[r + 1]; ++q) m = std::max(m, bmax[q]);
    lo = std::min(lo, m);
    up = std::max(up, m);
  }
  if (lo == -INFINITY) {  // a run of -inf blocks (AuxK's bias): start from the least finite maximum
    lo = INFINITY;
    for (int64_t q = 0; q < nb; ++q) lo = bmax[q] > -INFINITY ? std::min(lo, bmax[q]) : lo;
    if (!(count_ge(bmax, nbv, lo) >= k)) lo = -INFINITY;  // fewer than k finite blocks: take all
  }
  // Bisection: count(bmax >= lo) >= k holds throughout; stop once about k block maxima reach lo.
  if (std::isfinite(lo)) {
    for (int64_t it = 0, cl = count_ge(bmax, nbv, lo); it < 24 && cl > k + k / 4; ++it) {
      const float mid = lo + (up - lo) * 0.5f;
      if (!(mid > lo && mid < up)) break;
      const int64_t cm = count_ge(bmax, nbv, mid);
      if (cm >= k) {
        lo = mid;
        cl = cm;
      } else {
        up = mid;
      }
    }
  }
  return lo;
}

// The entries of p + bb that reach t: values to cv, indices to ci; returns their count, or
// (with CAP) cap + 1 as soon as more than cap reach it. One vector pass.
template <bool CAP>
static inline __attribute__((always_inline)) int64_t keep_ge(const float* p, const float* bb, int64_t n, float t,
                                                             float* cv, int64_t* ci, int64_t cap) {
  int64_t c = 0, j = 0;
#ifdef __AVX512F__
  const __m512 tv = _mm512_set1_ps(t);
  for (; j + VL <= n; j += VL) {
    prefetch_ahead(p + j);
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(p + j), _mm512_loadu_ps(bb + j));
    const __mmask16 hit = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
    if (hit) {
      _mm512_mask_compressstoreu_ps(cv + c, hit, v);
      for (uint32_t h = hit; h; h &= h - 1) ci[c++] = j + __builtin_ctz(h);
      if (CAP && c > cap) return cap + 1;
    }
  }
#endif
  for (; j < n; ++j) {
    const float v = p[j] + bb[j];
    cv[c] = v;
    ci[c] = j;
    c += v >= t;
  }
  return CAP ? std::min(c, cap + 1) : c;
}

// Rows of one batch are alike: the previous row's value of rank 3k/2 (s.guess) usually keeps
// between k and 8k entries of this one, which is then read once. Otherwise (and for a thread's
// first row, or k > 43) the block maxima give the threshold, in a second pass. Either way every
// entry that reaches the k-th largest is kept, so the result does not depend on the guess.
// Top-32 of 4096 x 4608: 7.7 -> 6.5 ms here, of 4096 x 16384: 19.9 -> 16.5 ms (the guess failed
// on 15% of the rows).
static void topk_row(const TopkPlan& P, TopkScratch& s, const float* p, const float* bb, float* V, int64_t* I) {
  const int64_t n = P.n, k = P.k;
  float* cv = s.cv.data();
  int64_t* ci = s.ci.data();
  int64_t c = std::isfinite(s.guess) ? keep_ge<true>(p, bb, n, s.guess, cv, ci, 8 * k) : -1;
  if (c < k || c > 8 * k) {
    c = keep_ge<false>(p, bb, n, block_threshold(P, s, p, bb), cv, ci, n);
    if (c < k) {  // fewer than k entries reach it (NaNs in the row): rank them all
      for (c = 0; c < n; ++c) {
        cv[c] = p[c] + bb[c];
        ci[c] = c;
      }
    }
  }
  uint64_t* keys = s.keys.data();
  for (int64_t t = 0; t < c; ++t) keys[t] = topk_key(cv[t], ci[t]);
  const int64_t jn = 0xFFFFFFFFu - uint32_t(top_keys(keys, c, k, std::max(k, P.guess_rank)));
  if (P.guess_rank > 0) s.guess = p[jn] + bb[jn];
  for (int64_t t = 0; t < k; ++t) {
    const int64_t jj = 0xFFFFFFFFu - uint32_t(keys[t]);
    I[t] = jj;
    V[t] = p[jj] + bb[jj];
  }
}

// pre: [B, n] float32, rows contiguous (its row stride may exceed n: the encoder's padded
// buffer); bias: [n] (or empty: none) -> (vals [B, k] descending, idx [B, k] int64).
// Adding the bias here, while the row is read anyway, spares the encoder GEMM a pass over its
// [B, n] output.
std::vector<at::Tensor> topk_rows(at::Tensor pre, int64_t k, at::Tensor bias) {
  TORCH_CHECK(pre.dim() == 2 && pre.scalar_type() == at::kFloat && pre.stride(1) == 1 &&
              pre.stride(0) >= pre.size(1), "topk_rows: pre must be float32 [B, n] with contiguous rows");
  const int64_t B = pre.size(0), n = pre.size(1), ld = pre.stride(0);
  TORCH_CHECK(k >= 1 && k <= n && n < (int64_t(1) << 31));
  if (bias.numel() == 0) bias = at::zeros({n}, pre.options());
  TORCH_CHECK(bias.is_contiguous() && bias.numel() == n && bias.scalar_type() == at::kFloat);
  const TopkPlan plan(n, k);
  auto vals = at::empty({B, k}, pre.options());
  auto idx = at::empty({B, k}, pre.options().dtype(at::kLong));
  const float *P = pre.data_ptr<float>(), *bb = bias.data_ptr<float>();
  float* V = vals.data_ptr<float>();
  int64_t* I = idx.data_ptr<int64_t>();
  at::parallel_for(0, B, grain(n), [&](int64_t b0, int64_t b1) {
    TopkScratch s(plan);
    for (int64_t b = b0; b < b1; ++b) topk_row(plan, s, P + b * ld, bb, V + b * k, I + b * k);
  });
  return {vals, idx};
}

// out[b] = bias + sum_i vals[b, i] * W[idx[b, i]]. idx, vals: [B, K]; W: [n, d]; bias: [d]
// -> [B, d]. B K d MACs; the next token's rows are prefetched while this one is summed.
at::Tensor gather_sum(at::Tensor idx, at::Tensor vals, at::Tensor W, at::Tensor bias) {
  const int64_t B = idx.size(0), K = idx.size(1), d = W.size(1);
  auto out = at::empty({B, d}, W.options());
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* Vv = vals.data_ptr<float>();
  const float* Wp = W.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, B, grain(K * d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b + 1 < b1)
        for (int64_t i = 0; i < K; ++i) prefetch_row(Wp + I[(b + 1) * K + i] * d, d);
      gather_row(O + b * d, bp, Wp, d, I + b * K, Vv + b * K, K);
    }
  });
  return out;
}

// Panel layout. The step's gathers read rows of W [n, d] (decode) and of the per-token rows
// (weight gradients) at random. Whole rows come from L3 at ~6 GB/s per core here; a 16-column slice
// of every row (a panel) fits in one core's 1 MiB L2, so the kernels below walk the columns
// one panel at a time, all tokens (or latents) inside: every gathered line then comes from L2.
// A matrix [N, d] packed into panels is [P, N, 16], P = ceil(d / 16), zero-padded on the right;
// zeros add nothing to sums and dot products, so padded columns need no special case until a
// result is written back row-major.
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

// M [N, d] in panels [P, N, 16], zero-padded. Blocks of 64 rows (in L2) go out panel by panel,
// so reads and writes both run sequentially. One read and one write of M.
static at::Tensor pack_panels(const at::Tensor& M) {
  const int64_t N = M.size(0), d = M.size(1), P = panels(d);
  auto out = at::empty({P, N, VL}, M.options());
  const float* src = M.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  constexpr int64_t RB = 64;
  at::parallel_for(0, (N + RB - 1) / RB, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t blk = k0; blk < k1; ++blk) {
      const int64_t r0 = blk * RB, r1 = std::min(N, r0 + RB);
      for (int64_t c = 0; c < P; ++c) {
        const int64_t w = std::min<int64_t>(VL, d - c * VL);
        for (int64_t r = r0; r < r1; ++r) vstore(dst + (c * N + r) * VL, load_cols(src + r * d + c * VL, w));
      }
    }
  });
  return out;
}

// A [d] vector zero-padded to P * 16.
static at::Tensor pad_vector(const at::Tensor& v) {
  const int64_t d = v.size(0);
  auto out = at::zeros({panels(d) * VL}, v.options());
  out.narrow(0, 0, d).copy_(v);
  return out;
}

// Writes the w = min(16, d - col) leading lanes of v to row-major dst (the last panel is partial).
static inline void store_cols(float* dst, vf v, int64_t w) {
  if (w == VL) {
    vstore(dst, v);
  } else {
    for (int64_t t = 0; t < w; ++t) dst[t] = v[t];
  }
}

// Sixteen dot products at once: lane s of the result is the sum of the lanes of p[s]. A
// transpose-and-add network, 45 shuffles and adds instead of 16 horizontal sums.
static inline __attribute__((always_inline)) vf sum_lanes16(const vf* p) {
#ifdef __AVX512F__
  __m512 l1[8], l2[4], l3[2];
  for (int s = 0; s < 8; ++s) {  // 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    const __m512 a = (__m512)p[2 * s], b = (__m512)p[2 * s + 1];
    l1[s] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int s = 0; s < 4; ++s) {  // 128-bit lane: four sources' partial sums
    const __m512d u = _mm512_castps_pd(l1[2 * s]), v = _mm512_castps_pd(l1[2 * s + 1]);
    l2[s] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u, v)), _mm512_castpd_ps(_mm512_unpackhi_pd(u, v)));
  }
  for (int s = 0; s < 2; ++s)
    l3[s] = _mm512_add_ps(_mm512_shuffle_f32x4(l2[2 * s], l2[2 * s + 1], 0x88),
                          _mm512_shuffle_f32x4(l2[2 * s], l2[2 * s + 1], 0xDD));
  return (vf)_mm512_add_ps(_mm512_shuffle_f32x4(l3[0], l3[1], 0x88), _mm512_shuffle_f32x4(l3[0], l3[1], 0xDD));
#else
  vf out;
  for (int s = 0; s < VL; ++s) out[s] = hsum(p[s]);
  return out;
#endif
}

// out[i] += <r, w_i> over NV panels for slots i in [i0, i1), w_i = row ib[i] of the panels Wc.
// Row offsets into a panel (latent index * 16) are int32: half the bytes of the index stream.
template <int NV>
static inline __attribute__((always_inline)) vf slot_product(const vf* r, const float* const* Wc, int32_t off) {
  vf acc = r[0] * vload(Wc[0] + off);
  for (int t = 1; t < NV; ++t) acc += r[t] * vload(Wc[t] + off);
  return acc;
}

template <int NV>
static inline __attribute__((always_inline)) void add_dots(const vf* r, const float* const* Wc, const int32_t* ib, int64_t i0, int64_t i1, float* out) {
  vf p[VL];
  int64_t s0 = i0;
  for (; s0 + VL <= i1; s0 += VL) {
    for (int s = 0; s < VL; ++s) p[s] = slot_product<NV>(r, Wc, ib[s0 + s]);
    vstore(out + s0, vload(out + s0) + sum_lanes16(p));
  }
  if (s0 < i1) {
    const int64_t m = i1 - s0;
    for (int64_t s = 0; s < VL; ++s) p[s] = s < m ? slot_product<NV>(r, Wc, ib[s0 + s]) : vbcast(0.f);
    const vf red = sum_lanes16(p);
    for (int64_t s = 0; s < m; ++s) out[s0 + s] += red[s];
  }
}

// acc += sum_{i in [i0, i1)} a_i w_i over NV panels; two chains of adds, for FMA latency.
template <int NV>
static inline __attribute__((always_inline)) void add_rows(vf* acc, const float* const* Wc, const int32_t* ib, const float* ab, int64_t i0, int64_t i1) {
  vf odd[NV];
  for (int t = 0; t < NV; ++t) odd[t] = vbcast(0.f);
  int64_t i = i0;
  for (; i + 2 <= i1; i += 2) {
    const vf a0 = vbcast(ab[i]), a1 = vbcast(ab[i + 1]);
    for (int t = 0; t < NV; ++t) {
      acc[t] += a0 * vload(Wc[t] + ib[i]);
      odd[t] += a1 * vload(Wc[t] + ib[i + 1]);
    }
  }
  if (i < i1)
    for (int t = 0; t < NV; ++t) acc[t] += vbcast(ab[i]) * vload(Wc[t] + ib[i]);
  for (int t = 0; t < NV; ++t) acc[t] += odd[t];
}

// The training decoder and everything its backward needs from the rows it gathers.
// idx, acts: [B, K] with slots [0, k) the TopK code, [k, k_main) the rest of the 4k code
// (multi-TopK; k_main = k otherwise) and [k_main, K) AuxK's dead latents; xc: [B, d] the
// normalised inputs less b_pre (the encoder's input too: the normaliser writes it in its pass);
// b_pre: [d], for recon only; W: [n, d] the decoder.
// Per token b, with w_i = W[idx[b, i]]:
//   recon   = b_pre + sum_{i<k} a_i w_i           r_main  = recon - x = sum_{i<k} a_i w_i - xc
//   r_multi = r_main + sum_{k<=i<k_main} a_i w_i            (multi-TopK: recon_4k - x)
//   r_aux   = r_main + sum_{i>=k_main} a_i w_i              (AuxK: aux recon minus the residual x - recon)
//   dots[b, i] = <r, w_i> with r the residual of slot i's term; head[b, i] = <r_multi, w_i>, i < k
// and over the batch: sq = (|x - b_pre|^2, |r_main|^2, |r_multi|^2, |r_aux|^2) and
// colsum = (sum_b r_main, sum_b r_multi, sum_b (x - b_pre)): [3, d]. The last row gives the
// batch's sum_b |x - mean|^2 = sq[0] - |colsum[2]|^2 / B without a pass for the mean first
// (b_pre sits near the data, so little cancels). The loss gradient w.r.t. a_i is a multiple of
// these dots, so the backward never gathers a decoder row again.
// rows: the caller's [P, S, B, 16] buffer, filled here with panels of the per-token rows
// [xc | r_main | r_multi | r_aux] (S = 2 + the terms present), the layout `weight_grads` reads a
// panel at a time (a reused buffer spares the ~B S d / 1024 page faults of a fresh one each step).
// Its lines are written with streaming stores (64-byte aligned): through the cache, 1 MB of them
// per 32 columns evicted W's panels from L2; streamed, the decoder took 3 ms less here.
// Returns [recon, dots, head, sq, colsum] (head: empty without multi-TopK; recon: [0, d]
// unless with_recon; sq: [*, 4] partial sums, to be added). path: 0 picks the panel path when
// two panels of W fit in L2 and `decode_by_rows` otherwise; 1 and 2 force one (tests).
// W_panels: W already in panels [P, n, 16] (`adam_unit_rows` writes them), or empty: W is
// packed here first (one pass). Cost ~2 B K d MACs plus a 16-way add network per 16 dots and
// 32 columns. Columns go 32 at a time (2 panels, 590 KB of W at n = 4608: L2),
// all tokens inside; each token's xc piece is read from its row (prefetched 8 tokens ahead: the
// 2,304-byte stride at d = 576 is past the hardware's stride prefetcher) and copied into slot 0
// on the way, 3 ms less here than packing x beforehand. Tokens are split into NG fixed groups
// whose column and square sums are added in order, so results do not depend on the thread count.
struct DecodeArgs {
  int64_t d, n, B, K, k, k_main, S;
  const float *X, *bp, *Wp, *A;  // X: [B, d] xc; bp: [P*16]; Wp: [P, n, 16]
  const int32_t* I;  // idx * 16: row offsets into a panel
  // RP: recon in panels [P, B, 16] or null; RW: rows [P, S, B, 16]; D: dots [B, K]; H: head [B, k]
  float *RP, *RW, *D, *H;
  float* slot(int64_t c, int64_t s, int64_t b) const { return RW + ((c * S + s) * B + b) * VL; }
};

template <int NV>
static inline __attribute__((always_inline)) void decode_tile(const DecodeArgs& g, int64_t b, int64_t c, vf* sums, vf* cs_main, vf* cs_multi,
                                                              vf* cs_x) {
  const int64_t K = g.K, k = g.k, km = g.k_main;
  const int32_t* ib = g.I + b * K;
  const float* ab = g.A + b * K;
  const float* Wc[NV];
  vf acc[NV], r[NV];
  for (int t = 0; t < NV; ++t) {
    Wc[t] = g.Wp + (c + t) * g.n * VL;
    acc[t] = vbcast(0.f);
  }
  add_rows<NV>(acc, Wc, ib, ab, 0, k);
  for (int t = 0; t < NV; ++t) {
    const float* xr = g.X + b * g.d + (c + t) * VL;
    if (b + 8 < g.B) __builtin_prefetch(xr + 8 * g.d);
    const vf xc = load_cols(xr, std::min<int64_t>(VL, g.d - (c + t) * VL));
    vstream(g.slot(c + t, 0, b), xc);
    if (g.RP) vstore(g.RP + ((c + t) * g.B + b) * VL, acc[t] + vload(g.bp + (c + t) * VL));
    r[t] = acc[t] - xc;
    vstream(g.slot(c + t, 1, b), r[t]);
    cs_main[t] += r[t];
    cs_x[t] += xc;
    sums[0] += xc * xc;
    sums[1] += r[t] * r[t];
  }
  add_dots<NV>(r, Wc, ib, 0, k, g.D + b * K);
  if (km > k) {
    vf rm[NV];
    for (int t = 0; t < NV; ++t) rm[t] = r[t];
    add_rows<NV>(rm, Wc, ib, ab, k, km);
    for (int t = 0; t < NV; ++t) {
      vstream(g.slot(c + t, 2, b), rm[t]);
      cs_multi[t] += rm[t];
      sums[2] += rm[t] * rm[t];
    }
    add_dots<NV>(rm, Wc, ib, 0, k, g.H + b * k);
    add_dots<NV>(rm, Wc, ib, k, km, g.D + b * K);
  }
  if (K > km) {
    add_rows<NV>(r, Wc, ib, ab, km, K);
    for (int t = 0; t < NV; ++t) {
      vstream(g.slot(c + t, g.S - 1, b), r[t]);
      sums[3] += r[t] * r[t];
    }
    add_dots<NV>(r, Wc, ib, km, K, g.D + b * K);
  }
}

// The same decoder token by token, for a W too wide for its panels to stay in L2: whole rows
// gathered from L3 stream better than single lines. Columns go 128 at a time: each gathered row
// piece is summed into registers and, once the residual piece is known, dotted with it while
// still in L1; the next token's rows are prefetched meanwhile. Same outputs and layout as the
// panel path (rows in panels; sq per token instead of per group).
struct RowDecodeArgs {
  int64_t d, K, k, k_main, B, S;
  const float *X, *bp, *W, *A;
  const int64_t* I;
  float *R, *RW, *D, *H, *SQ;  // R: recon or null
  float* at(int64_t s, int64_t b, int64_t col) const { return RW + (((col / VL) * S + s) * B + b) * VL + col % VL; }
};

template <int NV>
static void decode_row_columns(const RowDecodeArgs& g, int64_t b, int64_t c0, vf* pd, vf* ph, vf* sums,
                               float* cs_main, float* cs_multi, float* cs_x) {
  const int64_t d = g.d, K = g.K, k = g.k, k_main = g.k_main;
  const int64_t* ib = g.I + b * K;
  const float* ab = g.A + b * K;
  const float* xb = g.X + b * d + c0;
  vf acc[NV], r[NV];
  for (int t = 0; t < NV; ++t) acc[t] = vbcast(0.f);
  for (int64_t i = 0; i < k; ++i) {
    const vf a = vbcast(ab[i]);
    const float* w = g.W + ib[i] * d + c0;
    for (int t = 0; t < NV; ++t) acc[t] += a * vload(w + t * VL);
  }
  for (int t = 0; t < NV; ++t) {
    const int64_t col = c0 + t * VL;
    const vf xc = vload(xb + t * VL);
    if (g.R) vstore(g.R + b * d + col, acc[t] + vload(g.bp + col));
    vstream(g.at(0, b, col), xc);
    r[t] = acc[t] - xc;
    vstream(g.at(1, b, col), r[t]);
    vstore(cs_main + col, vload(cs_main + col) + r[t]);
    vstore(cs_x + col, vload(cs_x + col) + xc);
    sums[0] += xc * xc;
    sums[1] += r[t] * r[t];
  }
  for (int64_t i = 0; i < k; ++i) {
    const float* w = g.W + ib[i] * d + c0;
    vf s = pd[i];
    for (int t = 0; t < NV; ++t) s += r[t] * vload(w + t * VL);
    pd[i] = s;
  }
  if (k_main > k) {
    vf rm[NV];
    for (int t = 0; t < NV; ++t) rm[t] = r[t];
    for (int64_t i = k; i < k_main; ++i) {
      const vf a = vbcast(ab[i]);
      const float* w = g.W + ib[i] * d + c0;
      for (int t = 0; t < NV; ++t) rm[t] += a * vload(w + t * VL);
    }
    for (int t = 0; t < NV; ++t) {
      const int64_t col = c0 + t * VL;
      vstream(g.at(2, b, col), rm[t]);
      vstore(cs_multi + col, vload(cs_multi + col) + rm[t]);
      sums[2] += rm[t] * rm[t];
    }
    for (int64_t i = 0; i < k_main; ++i) {
      const float* w = g.W + ib[i] * d + c0;
      vf s = i < k ? ph[i] : pd[i];
      for (int t = 0; t < NV; ++t) s += rm[t] * vload(w + t * VL);
      (i < k ? ph[i] : pd[i]) = s;
    }
  }
  if (K > k_main) {
    for (int64_t i = k_main; i < K; ++i) {
      const vf a = vbcast(ab[i]);
      const float* w = g.W + ib[i] * d + c0;
      for (int t = 0; t < NV; ++t) r[t] += a * vload(w + t * VL);
    }
    for (int t = 0; t < NV; ++t) {
      vstream(g.at(g.S - 1, b, c0 + t * VL), r[t]);
      sums[3] += r[t] * r[t];
    }
    for (int64_t i = k_main; i < K; ++i) {
      const float* w = g.W + ib[i] * d + c0;
      vf s = pd[i];
      for (int t = 0; t < NV; ++t) s += r[t] * vload(w + t * VL);
      pd[i] = s;
    }
  }
}

// The last d % 16 columns, one at a time (same formulas as decode_row_columns).
static void decode_row_tail(const RowDecodeArgs& g, int64_t b, int64_t c0, float* td, float* th, float* ts,
                            float* cs_main, float* cs_multi, float* cs_x) {
  const int64_t d = g.d, K = g.K, k = g.k, k_main = g.k_main;
  const int64_t* ib = g.I + b * K;
  const float* ab = g.A + b * K;
  for (int64_t c = c0; c < d; ++c) {
    float acc = 0.f;
    for (int64_t i = 0; i < k; ++i) acc += ab[i] * g.W[ib[i] * d + c];
    const float xc = g.X[b * d + c];
    float r = acc - xc;
    if (g.R) g.R[b * d + c] = acc + g.bp[c];
    *g.at(0, b, c) = xc;
    *g.at(1, b, c) = r;
    cs_main[c] += r;
    cs_x[c] += xc;
    ts[0] += xc * xc;
    ts[1] += r * r;
    for (int64_t i = 0; i < k; ++i) td[i] += r * g.W[ib[i] * d + c];
    if (k_main > k) {
      float rm = r;
      for (int64_t i = k; i < k_main; ++i) rm += ab[i] * g.W[ib[i] * d + c];
      *g.at(2, b, c) = rm;
      cs_multi[c] += rm;
      ts[2] += rm * rm;
      for (int64_t i = 0; i < k_main; ++i) (i < k ? th[i] : td[i]) += rm * g.W[ib[i] * d + c];
    }
    if (K > k_main) {
      for (int64_t i = k_main; i < K; ++i) r += ab[i] * g.W[ib[i] * d + c];
      *g.at(g.S - 1, b, c) = r;
      ts[3] += r * r;
      for (int64_t i = k_main; i < K; ++i) td[i] += r * g.W[ib[i] * d + c];
    }
  }
}

// Fills recon (optional), rows, dots, head; returns sq [B, 4]. colsum_g: [NG, 3, P*16] zeros.
static at::Tensor decode_by_rows(const at::Tensor& xc, const at::Tensor& b_pre, const at::Tensor& W,
                                 const at::Tensor& idx, const at::Tensor& acts, int64_t k, int64_t k_main,
                                 at::Tensor& recon, at::Tensor& rows, at::Tensor& dots, at::Tensor& head,
                                 at::Tensor& colsum_g, int64_t NG) {
  const int64_t B = xc.size(0), d = xc.size(1), K = idx.size(1), S = rows.size(1), Pd = rows.size(0) * VL;
  const bool multi = k_main > k;
  if (d % VL) rows.select(0, rows.size(0) - 1).zero_();  // padded lanes of the last panel
  auto sq = at::empty({B, 4}, xc.options());
  RowDecodeArgs g{d, K, k, k_main, B, S, xc.data_ptr<float>(), b_pre.data_ptr<float>(),
                  W.data_ptr<float>(), acts.data_ptr<float>(), idx.data_ptr<int64_t>(),
                  recon.numel() ? recon.data_ptr<float>() : nullptr, rows.data_ptr<float>(),
                  dots.data_ptr<float>(), multi ? head.data_ptr<float>() : nullptr, sq.data_ptr<float>()};
  float* CS = colsum_g.data_ptr<float>();
  const int64_t dv = d / VL * VL;
  at::parallel_for(0, NG, 1, [&](int64_t q0, int64_t q1) {
    std::vector<vf> pd(K), ph(k);
    std::vector<float> td(K), th(k);
    for (int64_t q = q0; q < q1; ++q) {
      float* cs_main = CS + q * 3 * Pd;
      float *cs_multi = cs_main + Pd, *cs_x = cs_main + 2 * Pd;
      const int64_t b0 = q * B / NG, b1 = (q + 1) * B / NG;
      for (int64_t b = b0; b < b1; ++b) {
        if (b + 1 < b1)
          for (int64_t i = 0; i < k_main; ++i) prefetch_row(g.W + g.I[(b + 1) * K + i] * d, d);
        std::fill(pd.begin(), pd.end(), vbcast(0.f));
        std::fill(ph.begin(), ph.end(), vbcast(0.f));
        std::fill(td.begin(), td.end(), 0.f);
        std::fill(th.begin(), th.end(), 0.f);
        vf sums[4] = {vbcast(0.f), vbcast(0.f), vbcast(0.f), vbcast(0.f)};
        float ts[4] = {0.f, 0.f, 0.f, 0.f};
        int64_t c0 = 0;
        for (; c0 + 8 * VL <= dv; c0 += 8 * VL) decode_row_columns<8>(g, b, c0, pd.data(), ph.data(), sums, cs_main, cs_multi, cs_x);
        for (; c0 < dv; c0 += VL) decode_row_columns<1>(g, b, c0, pd.data(), ph.data(), sums, cs_main, cs_multi, cs_x);
        decode_row_tail(g, b, dv, td.data(), th.data(), ts, cs_main, cs_multi, cs_x);
        for (int64_t i = 0; i < K; ++i) g.D[b * K + i] = hsum(pd[i]) + td[i];
        if (multi)
          for (int64_t i = 0; i < k; ++i) g.H[b * k + i] = hsum(ph[i]) + th[i];
        for (int t = 0; t < 4; ++t) g.SQ[b * 4 + t] = hsum(sums[t]) + ts[t];
      }
    }
    stream_fence();
  });
  return sq;
}

// Whether two panels of a matrix with n rows (W's, or the token slots `weight_grads` reads) stay
// in L2 beside the streams (5/8 of it; 1 MiB when the size is unknown). Past that the panel
// path's single-line gathers come from L3.
static bool panels_fit_l2(int64_t n) {
  long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 <= 0) l2 = 1 << 20;
  return 2 * n * VL * int64_t(sizeof(float)) <= int64_t(l2) * 5 / 8;
}

std::vector<at::Tensor> decode_forward(at::Tensor xc, at::Tensor b_pre, at::Tensor W,
                                       at::Tensor idx, at::Tensor acts, int64_t k, int64_t k_main, bool with_recon,
                                       int64_t path, at::Tensor rows, at::Tensor W_panels) {
  TORCH_CHECK(xc.is_contiguous() && W.is_contiguous() && idx.is_contiguous() && acts.is_contiguous());
  TORCH_CHECK(path >= 0 && path <= 2, "decode_forward: path is 0 (by L2 size), 1 (panels) or 2 (rows)");
  const int64_t B = xc.size(0), d = xc.size(1), K = idx.size(1), n = W.size(0), P = panels(d);
  const bool multi = k_main > k, aux = K > k_main;
  auto opt = xc.options();
  const int64_t S = 2 + multi + aux;
  TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == at::kFloat && rows.sizes() == at::IntArrayRef({P, S, B, VL}),
              "decode_forward: rows must be a contiguous float32 [P, S, B, 16] buffer");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(rows.data_ptr()) % 64 == 0,
              "decode_forward: rows must be 64-byte aligned (a fresh torch.empty is)");
  auto recon = at::empty({with_recon ? B : 0, d}, opt);
  auto dots = at::zeros({B, K}, opt);
  auto head = multi ? at::zeros({B, k}, opt) : at::empty({0}, opt);
  constexpr int64_t NG = 16;  // fixed token groups for the column and square sums
  auto colsum_g = at::zeros({NG, 3, P * VL}, opt);
  if (path == 2 || (path == 0 && !panels_fit_l2(n))) {
    auto sq = decode_by_rows(xc, b_pre, W, idx, acts, k, k_main, recon, rows, dots, head, colsum_g, NG);
    return {recon, dots, head, sq, colsum_g.sum(0).narrow(1, 0, d)};
  }
  TORCH_CHECK(n * VL < (int64_t(1) << 31), "decode_forward: n too large for int32 panel offsets");
  TORCH_CHECK(W_panels.numel() == 0 || (W_panels.is_contiguous() && W_panels.sizes() == at::IntArrayRef({P, n, VL})),
              "decode_forward: W_panels must be empty or W in contiguous [P, n, 16] panels");
  auto Wp = W_panels.numel() ? W_panels : pack_panels(W);
  auto off = (idx * VL).to(at::kInt);
  auto bp = pad_vector(b_pre);
  auto recon_p = at::empty({with_recon ? P : 0, B, VL}, opt);
  auto sums_g = at::zeros({NG, 4, VL}, opt);
  DecodeArgs g{d, n, B, K, k, k_main, S, xc.data_ptr<float>(), bp.data_ptr<float>(), Wp.data_ptr<float>(),
               acts.data_ptr<float>(), off.data_ptr<int32_t>(), with_recon ? recon_p.data_ptr<float>() : nullptr,
               rows.data_ptr<float>(), dots.data_ptr<float>(), multi ? head.data_ptr<float>() : nullptr};
  float *CS = colsum_g.data_ptr<float>(), *SG = sums_g.data_ptr<float>();
  at::parallel_for(0, NG, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t c = 0; c < P;) {
      const int NV = c + 2 <= P ? 2 : 1;
      prefetch_lines_l2(g.Wp + c * n * VL, NV * n);  // panels c, c + 1 are adjacent
      for (int64_t q = q0; q < q1; ++q) {
        vf sums[4], cs_main[2] = {vbcast(0.f), vbcast(0.f)}, cs_multi[2] = {vbcast(0.f), vbcast(0.f)};
        vf cs_x[2] = {vbcast(0.f), vbcast(0.f)};
        for (int t = 0; t < 4; ++t) sums[t] = vload(SG + (q * 4 + t) * VL);
        for (int64_t b = q * B / NG; b < (q + 1) * B / NG; ++b) {
          if (NV == 2)
            decode_tile<2>(g, b, c, sums, cs_main, cs_multi, cs_x);
          else
            decode_tile<1>(g, b, c, sums, cs_main, cs_multi, cs_x);
        }
        for (int t = 0; t < 4; ++t) vstore(SG + (q * 4 + t) * VL, sums[t]);
        for (int t = 0; t < NV; ++t) {
          vstore(CS + (q * 3 + 0) * P * VL + (c + t) * VL, cs_main[t]);
          vstore(CS + (q * 3 + 1) * P * VL + (c + t) * VL, cs_multi[t]);
          vstore(CS + (q * 3 + 2) * P * VL + (c + t) * VL, cs_x[t]);
        }
      }
      c += NV;
    }
    stream_fence();
  });
  if (with_recon) {  // panels -> row-major, 64 tokens at a time (written while in L2)
    const float* RP = recon_p.data_ptr<float>();
    float* R = recon.data_ptr<float>();
    at::parallel_for(0, (B + 63) / 64, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t blk = k0; blk < k1; ++blk)
        for (int64_t c = 0; c < P; ++c)
          for (int64_t b = blk * 64; b < std::min(B, blk * 64 + 64); ++b)
            store_cols(R + b * d + c * VL, vload(RP + (c * B + b) * VL), std::min<int64_t>(VL, d - c * VL));
    });
  }
  return {recon, dots, head, sums_g.sum(2), colsum_g.sum(0).narrow(1, 0, d)};
}

// The loss gradient's coefficients of entry e = b K + i (slot i of token b): slots [0, k) are
// the TopK code, [k, k_main) the rest of the 4k code, [k_main, K) AuxK's. Each slot's term has
// its residual r and d loss / d r = c r (c_main, c_multi, c_aux); the loss gradient w.r.t. the
// slot's activation is c <r, w_i> = c dots[e] (plus c_multi head[b, i] for a TopK slot with
// multi-TopK, whose activation is in both codes). Same float operations, in the same order,
// as the torch ops they replace (bit-identical).
struct EntryCoefs {
  int64_t K, k, k_main;
  const float *A, *Pre, *D, *H;  // acts, pre, dots: [B, K]; head: [B, k] or null
  float c_main, c_multi, c_aux;
  float scale(int64_t i) const { return i < k ? c_main : i < k_main ? c_multi : c_aux; }
  // d loss / d pre-activation: 0 where the ReLU is off.
  float dpre(int64_t e, int64_t b, int64_t i) const {
    float da = D[e] * scale(i);
    if (H && i < k) {
      volatile float from_head = c_multi * H[b * k + i];  // rounded, as torch does: no FMA
      da += from_head;
    }
    return da * (Pre[e] > 0.f ? 1.f : 0.f);
  }
  // The activation's factor on its G row: with multi-TopK, a TopK slot's G row is already
  // c_main r_main + c_multi r_multi (the caller combines them in place), so the factor is 1.
  float dec(int64_t e, int64_t i) const { return A[e] * (H && i < k ? 1.f : scale(i)); }
  // Which G row a slot reads: r_main (0), r_multi (1 with multi-TopK), r_aux (after those).
  int64_t term(int64_t i) const { return i < k ? 0 : i < k_main ? 1 : (H ? 2 : 1); }
};

struct GradEntry {
  int32_t row;  // the token's row in the sweep's slots: b (x), or c B + b (gradient of term c)
  float coef;   // dpre (encoder sweep), coef_dec (decoder sweep)
};

// The entries grouped by latent, one array per sweep (a stable counting sort): returns crow
// [n + 1], latent j's entries being enc[crow[j], crow[j + 1]) and the same range of dec. The
// entries are cut into NS fixed slices, each counted and placed by one thread; within a latent,
// slice s's entries go after slice s - 1's, so the order is ascending e whatever the thread
// count. O(B K + NS n).
// dpre_out (or null) receives each entry's dpre.
static std::vector<int64_t> group_by_latent(const int64_t* I, int64_t nnz, int64_t n, int64_t B,
                                            const EntryCoefs& co, GradEntry* enc, GradEntry* dec,
                                            float* dpre_out) {
  const int64_t K = co.K;
  constexpr int64_t NS = 8;
  std::vector<int64_t> pos(NS * n, 0), crow(n + 1, 0);
  at::parallel_for(0, NS, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t e = s * nnz / NS; e < (s + 1) * nnz / NS; ++e) {
        TORCH_CHECK(I[e] >= 0 && I[e] < n, "latent index out of range");
        ++pos[s * n + I[e]];
      }
  });
  for (int64_t j = 0; j < n; ++j) {  // counts -> first positions, slice by slice
    int64_t p = crow[j];
    for (int64_t s = 0; s < NS; ++s) {
      const int64_t c = pos[s * n + j];
      pos[s * n + j] = p;
      p += c;
    }
    crow[j + 1] = p;
  }
  at::parallel_for(0, NS, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t e = s * nnz / NS; e < (s + 1) * nnz / NS; ++e) {
        const int64_t b = e / K, i = e - b * K, p = pos[s * n + I[e]]++;
        const float dp = co.dpre(e, b, i);
        if (dpre_out) dpre_out[e] = dp;
        enc[p] = {int32_t(b), dp};
        dec[p] = {int32_t(co.term(i) * B + b), co.dec(e, i)};
      }
  });
  return crow;
}

// out[j, col + 16 t] = sum over latent j's entries of coef * slab_t[row], for latents [j0, j1)
// and NV panels (slab_t = slab + t pstride, rows of 16 floats). Two chains of adds per panel,
// for FMA latency.
template <int NV>
static void sweep_latents(const float* slab, int64_t pstride, const GradEntry* rec, const int64_t* C,
                          int64_t j0, int64_t j1, float* out, int64_t d, int64_t col) {
  for (int64_t j = j0; j < j1; ++j) {
    vf a0[NV], a1[NV];
    for (int t = 0; t < NV; ++t) a0[t] = a1[t] = vbcast(0.f);
    int64_t p = C[j];
    for (; p + 2 <= C[j + 1]; p += 2) {
      const GradEntry &r0 = rec[p], &r1 = rec[p + 1];
      const vf c0 = vbcast(r0.coef), c1 = vbcast(r1.coef);
      for (int t = 0; t < NV; ++t) {
        a0[t] += c0 * vload(slab + t * pstride + int64_t(r0.row) * VL);
        a1[t] += c1 * vload(slab + t * pstride + int64_t(r1.row) * VL);
      }
    }
    if (p < C[j + 1])
      for (int t = 0; t < NV; ++t) a0[t] += vbcast(rec[p].coef) * vload(slab + t * pstride + int64_t(rec[p].row) * VL);
    for (int t = 0; t < NV; ++t) {
      // Streamed where a whole aligned line: each latent's line is on its own page, and cached
      // stores read every line in first (the gradients do not fit in cache): 41.6 -> 26.8 ms at
      // n = 16384, 19.4 -> 17.4 ms at n = 4608.
      float* o = out + j * d + col + t * VL;
      if (d - col - t * VL >= VL && reinterpret_cast<uintptr_t>(o) % 64 == 0)
        vstream(o, a0[t] + a1[t]);
      else
        store_cols(o, a0[t] + a1[t], std::min<int64_t>(VL, d - col - t * VL));
    }
  }
}

// One sweep over all columns: panels c (and c + 1 when two is set), from slot s0 of each.
static void sweep_columns(const float* RW, int64_t P, int64_t S, int64_t B, int64_t s0, bool two,
                          const GradEntry* rec, const int64_t* C, int64_t j0, int64_t j1, float* out, int64_t d) {
  const int64_t pstride = S * B * VL;
  for (int64_t c = 0; c < P;) {
    const float* slab = RW + c * pstride + s0 * B * VL;
    for (int64_t t = 0; t < (two && c + 2 <= P ? 2 : 1); ++t) prefetch_lines_l2(slab + t * pstride, B);
    if (two && c + 2 <= P) {
      sweep_latents<2>(slab, pstride, rec, C, j0, j1, out, d, c * VL);
      c += 2;
    } else {
      sweep_latents<1>(slab, pstride, rec, C, j0, j1, out, d, c * VL);
      c += 1;
    }
  }
}

// Both weight gradients of the sparse step, latent by latent: for latent j and each entry
// e = b K + i with idx[b, i] = j (ascending, a fixed summation order),
//   d_W_dec[j] += coef_dec(e) * G_c[b]           (c = `EntryCoefs::term(i)`)
//   d_W_enc[j] += dpre(e) * xc[b]                d_b_enc[j] += dpre(e)
// with the entry's coefficients from the forward's dots (`EntryCoefs`), so no [B, K] temporary
// is made for them. idx, acts, pre, dots: [B, K] (idx int64 latents < n); head: [B, k] with
// multi-TopK, else empty; rows: [P, S, B, 16], decode_forward's panels of [xc | G_0 | G_1 ...]
// per token (xc = x - b_pre; G_c the per-token loss gradient of term c, up to the factor
// coef_dec(e)); c_main, c_multi, c_aux: d loss / d r = c r for each residual r (as in
// `_FusedLoss.backward`); d: the columns -> (d_W_dec [n, d], d_W_enc [n, d], d_b_enc [n],
// dpre [B, K] when want_dpre, else empty).
// 2 B K d MACs. Two sweeps, d_W_enc's over the xc slot and d_W_dec's over the gradient slots,
// each with its own 8-byte entries (the row to read, its coefficient): the entries are
// streamed from L3 once per pass over the columns, and that stream, at ~6 GB/s per core here,
// was the kernel's largest cost. A pass takes 32 columns when two panels of the slots it reads
// fit in L2 (B 128 bytes per slot: 512 KB at B = 4096), else 16; every latent inside, its
// gradient pieces in registers. Latents are split into chunks of about equal entry counts
// (threads get equal work); every output element is written by one thread.
std::vector<at::Tensor> weight_grads(at::Tensor idx, int64_t n, int64_t k, int64_t k_main, at::Tensor rows,
                                     at::Tensor acts, at::Tensor pre, at::Tensor dots, at::Tensor head,
                                     double c_main, double c_multi, double c_aux, int64_t d, bool want_dpre) {
  TORCH_CHECK(rows.dim() == 4 && rows.is_contiguous() && acts.is_contiguous() && pre.is_contiguous() && dots.is_contiguous());
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.sizes() == acts.sizes() &&
              pre.sizes() == acts.sizes() && dots.sizes() == acts.sizes());
  const int64_t P = rows.size(0), S = rows.size(1), B = rows.size(2);
  const int64_t K = acts.size(1), nnz = idx.numel();
  const bool multi = k_main > k;
  TORCH_CHECK(P == panels(d) && S * B < (int64_t(1) << 31) && 0 < k && k <= k_main && k_main <= K);
  TORCH_CHECK(!multi || (head.is_contiguous() && head.sizes() == at::IntArrayRef({acts.size(0), k})));
  auto d_dec = at::empty({n, d}, rows.options()), d_enc = at::empty({n, d}, rows.options());
  auto d_benc = at::empty({n}, rows.options());
  auto dpre = at::empty({want_dpre ? acts.size(0) : 0, K}, rows.options());
  const float* RW = rows.data_ptr<float>();
  float *OD = d_dec.data_ptr<float>(), *OE = d_enc.data_ptr<float>(), *OB = d_benc.data_ptr<float>();
  const EntryCoefs co{K, k, k_main, acts.data_ptr<float>(), pre.data_ptr<float>(), dots.data_ptr<float>(),
                      multi ? head.data_ptr<float>() : nullptr, float(c_main), float(c_multi), float(c_aux)};
  // every entry is written below
  std::unique_ptr<GradEntry[]> enc(new GradEntry[nnz]), dec(new GradEntry[nnz]);
  const std::vector<int64_t> crow = group_by_latent(idx.data_ptr<int64_t>(), nnz, n, B, co, enc.get(), dec.get(),
                                                    want_dpre ? dpre.data_ptr<float>() : nullptr);
  const int64_t* C = crow.data();
  at::parallel_for(0, n, grain(64), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float db = 0.f;
      for (int64_t p = C[j]; p < C[j + 1]; ++p) db += enc[p].coef;
      OB[j] = db;
    }
  });
  const bool two_enc = panels_fit_l2(B), two_dec = panels_fit_l2((S - 1) * B);  // 32 columns a pass
  // Chunk boundaries at equal shares of the entries.
  constexpr int64_t NC = 64;
  std::vector<int64_t> bound(NC + 1, n);
  for (int64_t q = 0, j = 0; q <= NC; ++q) {
    while (j < n && C[j] < q * nnz / NC) ++j;
    bound[q] = q == NC ? n : j;
  }
  at::parallel_for(0, NC, 1, [&](int64_t q0, int64_t q1) {
    const int64_t j0 = bound[q0], j1 = bound[q1];
    sweep_columns(RW, P, S, B, 0, two_enc, enc.get(), C, j0, j1, OE, d);
    sweep_columns(RW, P, S, B, 1, two_dec, dec.get(), C, j0, j1, OD, d);
    stream_fence();
  });
  return {d_dec, d_enc, d_benc, dpre};
}

// How many entries of each latent fire: counts[j] = #{e : idx[e] = j, vals[e] > threshold}.
// idx: [B, K] int64 < n; vals: [B, K] -> [n] float32. O(B K + n), one thread: the increments
// land in an n-float array in L1, where torch's gt, cast and index_add took 0.6 ms at B K = 131k.
at::Tensor fire_counts(at::Tensor idx, at::Tensor vals, int64_t n, double threshold) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && vals.is_contiguous() && idx.sizes() == vals.sizes());
  auto counts = at::zeros({n}, vals.options());
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* V = vals.data_ptr<float>();
  float* out = counts.data_ptr<float>();
  const float t = float(threshold);
  for (int64_t e = 0; e < idx.numel(); ++e) {
    TORCH_CHECK(I[e] >= 0 && I[e] < n, "fire_counts: latent index out of range");
    out[I[e]] += V[e] > t;
  }
  return counts;
}

// Per-token normalisation, each row while it is in L1: shift = mean(x_b), c = x_b - shift,
// scale = max(||c||, eps), out_b = c / scale - offset (offset: [d], or empty: none; training
// subtracts b_pre here, a pass fewer). x: [B, d] -> (out [B, d], shift [B, 1], scale [B, 1]).
// ~4 B d flops, one read and one write of x, where torch's mean, sub, norm, clamp, div and sub
// made six passes.
std::vector<at::Tensor> normalize_tokens(at::Tensor x, double eps, at::Tensor offset) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat);
  const int64_t B = x.size(0), d = x.size(1), dv = d / VL * VL;
  if (offset.numel() == 0) offset = at::zeros({d}, x.options());
  TORCH_CHECK(offset.is_contiguous() && offset.numel() == d && offset.scalar_type() == at::kFloat,
              "normalize_tokens: offset must be a float32 [d] vector or empty");
  const float* OFF = offset.data_ptr<float>();
  auto out = at::empty_like(x), shift = at::empty({B, 1}, x.options()), scale = at::empty({B, 1}, x.options());
  const float* X = x.data_ptr<float>();
  float *O = out.data_ptr<float>(), *SH = shift.data_ptr<float>(), *SC = scale.data_ptr<float>();
  const float fe = eps;
  at::parallel_for(0, B, grain(4 * d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = X + b * d;
      vf s = vbcast(0.f);
      for (int64_t c = 0; c < dv; c += VL) s += vload(xb + c);
      float sum = hsum(s);
      for (int64_t c = dv; c < d; ++c) sum += xb[c];
      const float mu = sum / float(d);
      vf q = vbcast(0.f);
      for (int64_t c = 0; c < dv; c += VL) {
        const vf v = vload(xb + c) - vbcast(mu);
        q += v * v;
      }
      float sq = hsum(q);
      for (int64_t c = dv; c < d; ++c) sq += (xb[c] - mu) * (xb[c] - mu);
      const float sc = std::max(std::sqrt(sq), fe);
      float* ob = O + b * d;
      for (int64_t c = 0; c < dv; c += VL) vstore(ob + c, (vload(xb + c) - vbcast(mu)) / vbcast(sc) - vload(OFF + c));
      for (int64_t c = dv; c < d; ++c) ob[c] = (xb[c] - mu) / sc - OFF[c];
      SH[b] = mu;
      SC[b] = sc;
    }
  });
  return {out, shift, scale};
}

// Unit-norm decoder rows, one pass each. W, G: [n, d].
// project: G[j] -= <G[j], W[j]> W[j] (the gradient's component along its row, removed).
void project_rows(at::Tensor W, at::Tensor G) {
  TORCH_CHECK(W.is_contiguous() && G.is_contiguous() && W.sizes() == G.sizes());
  const int64_t n = W.size(0), d = W.size(1);
  const float* Wp = W.data_ptr<float>();
  float* Gp = G.data_ptr<float>();
  at::parallel_for(0, n, grain(2 * d), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* w = Wp + j * d;
      float* g = Gp + j * d;
      const float s = dot(g, w, d);
      for (int64_t c = 0; c < d; ++c) g[c] -= s * w[c];
    }
  });
}

// w /= ||w|| over d floats (a row of zero norm is left as it is).
static inline void normalize_row(float* w, int64_t d) {
  const float sq = dot(w, w, d);
  if (sq > 0.f) {
    const float inv = 1.f / std::sqrt(sq);
    for (int64_t c = 0; c < d; ++c) w[c] *= inv;
  }
}

// normalize: every row of W to unit norm (`normalize_row`).
void normalize_rows(at::Tensor W) {
  TORCH_CHECK(W.is_contiguous());
  const int64_t n = W.size(0), d = W.size(1);
  float* Wp = W.data_ptr<float>();
  at::parallel_for(0, n, grain(2 * d), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) normalize_row(Wp + j * d, d);
  });
}

// Lane-wise square root.
static inline vf vsqrt(vf v) {
#ifdef __AVX512F__
  return (vf)_mm512_sqrt_ps((__m512)v);
#else
  for (int t = 0; t < VL; ++t) v[t] = std::sqrt(v[t]);
  return v;
#endif
}

// The unit-norm decoder's whole optimiser step in one pass over its rows (rows are independent):
//   g = G[j] - <G[j], W[j]> W[j]                        the gradient's tangent part (W[j] unit)
//   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2                  Adam's moments
//   W[j] -= step_size m / (sqrt(v) / bc2_sqrt + eps),  then W[j] /= ||W[j]||
// and, when panels is not empty, W into panels [P, n, 16] for the next step's decoder, 64 rows
// at a time while they are in L2. W, G, m, v: [n, d]; G is read only. ~20 flops per element;
// reads 4 matrices and writes 3 (+ the panels) once, where project_rows, Adam, normalize_rows
// and packing read 8 and write 6: 2.7 ms less at n = 4608 here, 6 ms less at n = 16384.
void adam_unit_rows(at::Tensor W, at::Tensor G, at::Tensor m, at::Tensor v, at::Tensor panels_out,
                    double step_size, double beta1, double beta2, double eps, double bc2_sqrt) {
  TORCH_CHECK(W.is_contiguous() && G.is_contiguous() && m.is_contiguous() && v.is_contiguous());
  TORCH_CHECK(W.sizes() == G.sizes() && W.sizes() == m.sizes() && W.sizes() == v.sizes());
  const int64_t n = W.size(0), d = W.size(1), P = panels(d);
  const bool pack = panels_out.numel() > 0;
  TORCH_CHECK(!pack || (panels_out.is_contiguous() && panels_out.sizes() == at::IntArrayRef({P, n, VL})),
              "adam_unit_rows: panels must be a contiguous [P, n, 16] buffer or empty");
  float *Wp = W.data_ptr<float>(), *Mp = m.data_ptr<float>(), *Vp = v.data_ptr<float>();
  const float* Gp = G.data_ptr<float>();
  float* Pp = pack ? panels_out.data_ptr<float>() : nullptr;
  const float b1 = beta1, b2 = beta2, c1 = 1.0 - beta1, c2 = 1.0 - beta2, ss = step_size, ep = eps;
  const float ibc2 = 1.0 / bc2_sqrt;
  constexpr int64_t RB = 64;
  at::parallel_for(0, (n + RB - 1) / RB, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t r0 = k0 * RB; r0 < std::min(n, k1 * RB); r0 += RB) {
      const int64_t r1 = std::min(n, r0 + RB);
      for (int64_t j = r0; j < r1; ++j) {
        float *w = Wp + j * d, *mj = Mp + j * d, *vj = Vp + j * d;
        const float* g = Gp + j * d;
        const float s = dot(g, w, d);
        int64_t c = 0;
        for (; c + VL <= d; c += VL) {
          const vf wv = vload(w + c), gv = vload(g + c) - vbcast(s) * wv;
          const vf mv = vbcast(b1) * vload(mj + c) + vbcast(c1) * gv;
          const vf vv = vbcast(b2) * vload(vj + c) + vbcast(c2) * gv * gv;
          vstore(mj + c, mv);
          vstore(vj + c, vv);
          vstore(w + c, wv - vbcast(ss) * mv / (vsqrt(vv) * vbcast(ibc2) + vbcast(ep)));
        }
        for (; c < d; ++c) {
          const float gv = g[c] - s * w[c];
          mj[c] = b1 * mj[c] + c1 * gv;
          vj[c] = b2 * vj[c] + c2 * gv * gv;
          w[c] -= ss * mj[c] / (std::sqrt(vj[c]) * ibc2 + ep);
        }
        normalize_row(w, d);  // the row is in L1
      }
      if (pack)
        for (int64_t c = 0; c < P; ++c) {
          const int64_t wd = std::min<int64_t>(VL, d - c * VL);
          for (int64_t j = r0; j < r1; ++j) vstore(Pp + (c * n + j) * VL, load_cols(Wp + j * d + c * VL, wd));
        }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_rows", &project_rows);
  m.def("normalize_rows", &normalize_rows);
  m.def("topk_rows", &topk_rows);
  m.def("gather_sum", &gather_sum);
  m.def("decode_forward", &decode_forward);
  m.def("weight_grads", &weight_grads);
  m.def("adam_unit_rows", &adam_unit_rows);
  m.def("panels_fit_l2", &panels_fit_l2);
  m.def("fire_counts", &fire_counts);
  m.def("normalize_tokens", &normalize_tokens);
}
"""


def _cpu_tag() -> str:
    """A short digest of this CPU's feature flags: -march=native builds must not be shared
    between machines with different instruction sets."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def _source_tag() -> str:
    return hashlib.sha256(_SOURCE.encode()).hexdigest()[:8]


def _env_tag() -> str:
    """The environment the build links against: two checkouts' venvs (other torch include
    paths) sharing one build folder would each find the other's build stale and recompile."""
    import torch

    return hashlib.sha256(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:8]


@cache
def load() -> ModuleType | None:
    """The compiled kernels (built once per source version and CPU into torch's extension cache)."""
    if os.environ.get("SAEFLOW_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            # Keyed by source and environment too: processes holding another version of this
            # file or another venv (a concurrent test run, another checkout) build elsewhere
            # instead of overwriting this build.
            name=f"saeflow_sparse_kernels_{_cpu_tag()}_{_source_tag()}_{_env_tag()}",
            cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - no compiler/headers: fall back to stock ops
        warnings.warn(
            f"native SAE kernels unavailable ({type(err).__name__}); using stock torch ops",
            stacklevel=2,
        )
        return None
