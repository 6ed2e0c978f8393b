// Both weight gradients of the sparse step (`weight_grads`): one latent-major pass over the
// per-token rows `decode_forward` left, with each entry's coefficients made from its dots.
#include <ATen/Parallel.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "alloc.h"
#include "checks.h"
#include "common.h"
#include "kernels.h"
#include "panels.h"

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
        TORCH_CHECK(I[e] >= 0 && I[e] < n, "weight_grads: idx must hold latents in [0, n)");
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
// is made for them. idx, acts, pre, dots: [B, K] (idx int64 latents < n, checked as they are
// grouped; the rest float32); head: [B, k] float32 with multi-TopK (k_main > k), else ignored;
// rows: [P, S, B, 16] float32, decode_forward's panels of [xc | G_0 | G_1 ...]
// per token (xc = x - b_pre; G_c the per-token loss gradient of term c, up to the factor
// coef_dec(e)); c_main, c_multi, c_aux: d loss / d r = c r for each residual r (as in
// `_FusedLoss.backward`); d: the columns -> (d_W_dec [n, d], d_W_enc [n, d], d_b_enc [n],
// dpre [B, K] when want_dpre, else empty), float32, all written here.
// 2 B K d MACs; traffic: idx, acts, pre and dots read once (grouping), rows once (each panel's
// lines then gathered from L2), 8 B K bytes of entries per sweep and pass, the gradients written
// once (streamed). Two sweeps, d_W_enc's over the xc slot and d_W_dec's over the gradient slots,
// each with its own 8-byte entries (the row to read, its coefficient): the entries are
// streamed from L3 once per pass over the columns, and that stream, at ~6 GB/s per core here,
// was the kernel's largest cost. A pass takes 32 columns when two panels of the slots it reads
// fit in L2 (B 128 bytes per slot: 512 KB at B = 4096), else 16; every latent inside, its
// gradient pieces in registers. Latents are split into chunks of about equal entry counts
// (threads get equal work); every output element is written by one thread.
std::vector<at::Tensor> weight_grads(at::Tensor idx, int64_t n, int64_t k, int64_t k_main, at::Tensor rows,
                                     at::Tensor acts, at::Tensor pre, at::Tensor dots, at::Tensor head,
                                     double c_main, double c_multi, double c_aux, int64_t d, bool want_dpre) {
  constexpr const char* fn = "weight_grads";
  check_tensor(fn, "idx", idx, at::kLong, "[B, K]", {kAnySize, kAnySize});
  const int64_t B = idx.size(0), K = idx.size(1), nnz = idx.numel();
  check_tensor(fn, "acts", acts, at::kFloat, "[B, K]", {B, K});
  check_tensor(fn, "pre", pre, at::kFloat, "[B, K]", {B, K});
  check_tensor(fn, "dots", dots, at::kFloat, "[B, K]", {B, K});
  TORCH_CHECK(n >= 1 && d >= 1, "weight_grads: need n >= 1 latents and d >= 1 columns; got n = ", n, ", d = ", d);
  TORCH_CHECK(1 <= k && k <= k_main && k_main <= K, "weight_grads: need 1 <= k <= k_main <= K = ", K, "; got k = ", k,
              ", k_main = ", k_main);
  const bool multi = k_main > k;
  const int64_t P = panels(d), S = 2 + multi + (K > k_main);
  check_tensor(fn, "rows", rows, at::kFloat, "[P, S, B, 16]", {P, S, B, VL});
  TORCH_CHECK(S * B < (int64_t(1) << 31), "weight_grads: S B must be below 2^31 (int32 rows); got ", S * B);
  if (multi) check_tensor(fn, "head", head, at::kFloat, "[B, k]", {B, k});
  auto d_dec = empty_cpu({n, d}, rows.options()), d_enc = empty_cpu({n, d}, rows.options());
  auto d_benc = empty_cpu({n}, rows.options());
  auto dpre = empty_cpu({want_dpre ? acts.size(0) : 0, K}, rows.options());
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
