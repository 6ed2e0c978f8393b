// The inference decoder (`gather_sum`): each token's reconstruction from its selected latents,
// whole decoder rows gathered. Training uses `decode_forward` instead, which also makes what the
// backward needs.
#include <ATen/Parallel.h>

#include "alloc.h"
#include "checks.h"
#include "common.h"
#include "kernels.h"

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

// out[b] = bias + sum_i vals[b, i] * W[idx[b, i]]. idx: [B, K] int64 latents < n (not checked:
// that is a pass over them); vals: [B, K] float32; W: [n, d] float32; bias: [d] float32 -> out
// [B, d] float32, written here once. B K d MACs, reading B K rows of W (from L3 or memory: the
// next token's rows are prefetched while this one is summed).
at::Tensor gather_sum(at::Tensor idx, at::Tensor vals, at::Tensor W, at::Tensor bias) {
  check_tensor("gather_sum", "idx", idx, at::kLong, "[B, K]", {kAnySize, kAnySize});
  const int64_t B = idx.size(0), K = idx.size(1);
  check_tensor("gather_sum", "vals", vals, at::kFloat, "[B, K]", {B, K});
  check_tensor("gather_sum", "W", W, at::kFloat, "[n, d]", {kAnySize, kAnySize});
  const int64_t d = W.size(1);
  check_tensor("gather_sum", "bias", bias, at::kFloat, "[d]", {d});
  auto out = empty_cpu({B, d}, W.options());
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
