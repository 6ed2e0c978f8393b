// The row-wise top-k (`topk_rows`): the TopK activation's selection, and AuxK's.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "alloc.h"
#include "checks.h"
#include "common.h"
#include "kernels.h"

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
// buffer); bias: [n] float32 (or empty: none); 1 <= k <= n < 2^31 -> (vals [B, k] float32
// descending, idx [B, k] int64), both written here.
// Adding the bias here, while the row is read anyway, spares the encoder GEMM a pass over its
// [B, n] output. Cost: one read of pre (B n floats; a second for the rows whose guessed
// threshold fails), ~B n / 16 vector ops plus O(B (nb + c^2 / 8)) for the thresholds and ranks.
std::vector<at::Tensor> topk_rows(at::Tensor pre, int64_t k, at::Tensor bias) {
  TORCH_CHECK(pre.device().is_cpu() && pre.scalar_type() == at::kFloat && pre.dim() == 2 && pre.stride(1) == 1 &&
                  pre.stride(0) >= pre.size(1),
              "topk_rows: pre must be a float32 CPU tensor of shape [B, n] with contiguous rows; got ",
              describe(pre), ", strides ", pre.strides());
  const int64_t B = pre.size(0), n = pre.size(1), ld = pre.stride(0);
  TORCH_CHECK(n < (int64_t(1) << 31), "topk_rows: pre's rows must be shorter than 2^31 (the keys hold 32-bit "
              "indices); got n = ", n);
  TORCH_CHECK(k >= 1 && k <= n, "topk_rows: k must be in [1, n] = [1, ", n, "]; got ", k);
  check_tensor_or_empty("topk_rows", "bias", bias, at::kFloat, "[n]", {n});
  if (bias.numel() == 0) bias = zeros_cpu({n}, pre.options());
  const TopkPlan plan(n, k);
  auto vals = empty_cpu({B, k}, pre.options());
  auto idx = empty_cpu({B, k}, pre.options().dtype(at::kLong));
  const float *P = pre.data_ptr<float>(), *bb = bias.data_ptr<float>();
  float* V = vals.data_ptr<float>();
  int64_t* I = idx.data_ptr<int64_t>();
  at::parallel_for(0, B, grain(n), [&](int64_t b0, int64_t b1) {
    TopkScratch s(plan);
    for (int64_t b = b0; b < b1; ++b) topk_row(plan, s, P + b * ld, bb, V + b * k, I + b * k);
  });
  return {vals, idx};
}
