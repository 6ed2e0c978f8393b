// Per-token normalisation of the inputs (`normalize_tokens`), one pass over each token.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "alloc.h"
#include "checks.h"
#include "common.h"
#include "kernels.h"

// Per-token normalisation, each row while it is in L1: shift = mean(x_b), c = x_b - shift,
// scale = max(||c||, eps), out_b = c / scale - offset (offset: [d], or empty: none; training
// subtracts b_pre here, a pass fewer). x: [B, d] float32 -> (out [B, d], shift [B, 1], scale
// [B, 1]) float32, written here. ~4 B d flops, one read and one write of x, where torch's mean,
// sub, norm, clamp, div and sub made six passes.
std::vector<at::Tensor> normalize_tokens(at::Tensor x, double eps, at::Tensor offset) {
  check_tensor("normalize_tokens", "x", x, at::kFloat, "[B, d]", {kAnySize, kAnySize});
  const int64_t B = x.size(0), d = x.size(1), dv = d / VL * VL;
  check_tensor_or_empty("normalize_tokens", "offset", offset, at::kFloat, "[d]", {d});
  if (offset.numel() == 0) offset = zeros_cpu({d}, x.options());
  const float* OFF = offset.data_ptr<float>();
  auto out = empty_cpu(x.sizes(), x.options()), shift = empty_cpu({B, 1}, x.options()), scale = empty_cpu({B, 1}, x.options());
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
