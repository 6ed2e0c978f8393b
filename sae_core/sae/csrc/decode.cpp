// The training decoder (`decode_forward`): each token's reconstruction, its residuals and the dot
// products the backward needs, in one token-major pass over W's panels. Its row-by-row layout, for
// a W whose panels do not fit in L2, is in decode_rows.cpp.
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "alloc.h"
#include "checks.h"
#include "common.h"
#include "decode_rows.h"
#include "kernels.h"
#include "panels.h"

// M [N, d] in panels [P, N, 16], zero-padded. Blocks of 64 rows (in L2) go out panel by panel,
// so reads and writes both run sequentially. One read and one write of M.
static at::Tensor pack_panels(const at::Tensor& M) {
  const int64_t N = M.size(0), d = M.size(1), P = panels(d);
  auto out = empty_cpu({P, N, VL}, M.options());
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
  auto out = zeros_cpu({panels(d) * VL}, v.options());
  out.narrow(0, 0, d).copy_(v);
  return out;
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

// What the panel path's tiles read and write (see `decode_forward`).
struct DecodeArgs {
  int64_t d, n, B, K, k, k_main, S;
  const float *X, *bp, *Wp, *A;  // X: [B, d] xc; bp: [P*16]; Wp: [P, n, 16]
  const int32_t* I;  // idx * 16: row offsets into a panel
  // RP: recon in panels [P, B, 16] or null; RW: rows [P, S, B, 16]; D: dots [B, K]; H: head [B, k]
  float *RP, *RW, *D, *H;
  float* slot(int64_t c, int64_t s, int64_t b) const { return RW + ((c * S + s) * B + b) * VL; }
};

// Token b over panels [c, c + NV): its sums in registers, its residual pieces streamed into the
// rows, its dots added into D (and H); sums and cs_* gather its group's squares and column sums.
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

// The training decoder and everything its backward needs from the rows it gathers.
// idx, acts: [B, K] with slots [0, k) the TopK code, [k, k_main) the rest of the 4k code
// (multi-TopK; k_main = k otherwise) and [k_main, K) AuxK's dead latents; xc: [B, d] the
// normalised inputs less b_pre (the encoder's input too: the normaliser writes it in its pass);
// b_pre: [d], for recon only; W: [n, d] the decoder. All float32 but idx (int64 latents < n, not
// checked: that would be a pass over them).
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
// 32 columns; traffic: xc and W's panels read once (each gathered line then comes from L2), idx
// and acts once per 32 columns, rows, dots and recon written once. Columns go 32 at a time
// (2 panels, 590 KB of W at n = 4608: L2),
// all tokens inside; each token's xc piece is read from its row (prefetched 8 tokens ahead: the
// 2,304-byte stride at d = 576 is past the hardware's stride prefetcher) and copied into slot 0
// on the way, 3 ms less here than packing x beforehand. Tokens are split into NG fixed groups
// whose column and square sums are added in order, so results do not depend on the thread count.
std::vector<at::Tensor> decode_forward(at::Tensor xc, at::Tensor b_pre, at::Tensor W,
                                       at::Tensor idx, at::Tensor acts, int64_t k, int64_t k_main, bool with_recon,
                                       int64_t path, at::Tensor rows, at::Tensor W_panels) {
  constexpr const char* fn = "decode_forward";
  check_tensor(fn, "xc", xc, at::kFloat, "[B, d]", {kAnySize, kAnySize});
  const int64_t B = xc.size(0), d = xc.size(1), P = panels(d);
  check_tensor(fn, "b_pre", b_pre, at::kFloat, "[d]", {d});
  check_tensor(fn, "W", W, at::kFloat, "[n, d]", {kAnySize, d});
  check_tensor(fn, "idx", idx, at::kLong, "[B, K]", {B, kAnySize});
  const int64_t K = idx.size(1), n = W.size(0);
  check_tensor(fn, "acts", acts, at::kFloat, "[B, K]", {B, K});
  TORCH_CHECK(1 <= k && k <= k_main && k_main <= K, "decode_forward: need 1 <= k <= k_main <= K = ", K, "; got k = ",
              k, ", k_main = ", k_main);
  TORCH_CHECK(path >= 0 && path <= 2, "decode_forward: path is 0 (by L2 size), 1 (panels) or 2 (rows); got ", path);
  const bool multi = k_main > k, aux = K > k_main;
  auto opt = xc.options();
  const int64_t S = 2 + multi + aux;
  check_tensor(fn, "rows", rows, at::kFloat, "[P, S, B, 16]", {P, S, B, VL});
  TORCH_CHECK(reinterpret_cast<uintptr_t>(rows.data_ptr()) % 64 == 0,
              "decode_forward: rows must be 64-byte aligned (a fresh torch.empty is)");
  check_tensor_or_empty(fn, "W_panels", W_panels, at::kFloat, "[P, n, 16]", {P, n, VL});
  auto recon = empty_cpu({with_recon ? B : 0, d}, opt);
  auto dots = zeros_cpu({B, K}, opt);
  auto head = multi ? zeros_cpu({B, k}, opt) : empty_cpu({0}, opt);
  constexpr int64_t NG = 16;  // fixed token groups for the column and square sums
  auto colsum_g = zeros_cpu({NG, 3, P * VL}, opt);
  if (path == 2 || (path == 0 && !panels_fit_l2(n))) {
    auto sq = decode_by_rows(xc, b_pre, W, idx, acts, k, k_main, recon, rows, dots, head, colsum_g, NG);
    return {recon, dots, head, sq, colsum_g.sum(0).narrow(1, 0, d)};
  }
  TORCH_CHECK(n * VL < (int64_t(1) << 31), "decode_forward: n too large for int32 panel offsets; got n = ", n);
  auto Wp = W_panels.numel() ? W_panels : pack_panels(W);
  auto off = idx.mul(VL).to(at::kInt);
  auto bp = pad_vector(b_pre);
  auto recon_p = empty_cpu({with_recon ? P : 0, B, VL}, opt);
  auto sums_g = zeros_cpu({NG, 4, VL}, opt);
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
