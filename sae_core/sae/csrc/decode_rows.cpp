// The training decoder (`decode_forward`, decode.cpp) token by token, for a W too wide for its
// panels to stay in L2: whole rows gathered from L3 stream better than single lines. Columns go
// 128 at a time: each gathered row piece is summed into registers and, once the residual piece
// is known, dotted with it while still in L1; the next token's rows are prefetched meanwhile.
// Same outputs and layout as the panel path (rows in panels; sq per token instead of per group).
#include <ATen/Parallel.h>

#include <vector>

#include "alloc.h"
#include "common.h"
#include "decode_rows.h"

// What `decode_row_columns` and `decode_row_tail` read and write.
struct RowDecodeArgs {
  int64_t d, K, k, k_main, B, S;
  const float *X, *bp, *W, *A;
  const int64_t* I;
  float *R, *RW, *D, *H, *SQ;  // R: recon or null
  float* at(int64_t s, int64_t b, int64_t col) const { return RW + (((col / VL) * S + s) * B + b) * VL + col % VL; }
};

// Token b's columns [c0, c0 + 16 NV): its sums in registers, its residual pieces streamed into the
// rows and added into the column sums; its dots accumulate in pd (and ph) across the pieces.
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

// Shapes, outputs and cost: decode_rows.h.
at::Tensor decode_by_rows(const at::Tensor& xc, const at::Tensor& b_pre, const at::Tensor& W,
                          const at::Tensor& idx, const at::Tensor& acts, int64_t k, int64_t k_main,
                          at::Tensor& recon, at::Tensor& rows, at::Tensor& dots, at::Tensor& head,
                          at::Tensor& colsum_g, int64_t NG) {
  const int64_t B = xc.size(0), d = xc.size(1), K = idx.size(1), S = rows.size(1), Pd = rows.size(0) * VL;
  const bool multi = k_main > k;
  if (d % VL) rows.select(0, rows.size(0) - 1).zero_();  // padded lanes of the last panel
  auto sq = empty_cpu({B, 4}, xc.options());
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
