"""Native CPU kernels for the sparse step, compiled on first use (torch cpp_extension + OpenMP).

Each kernel is O(work actually needed): a row-wise top-k that filters each row against a
threshold taken from a sample of it, and the B K d gathers and scatters of the sparse decoder and encoder
backward. All are deterministic: every output element is written by one thread in a fixed order.

`load()` returns the compiled module, or None when no compiler is available or
SAEFLOW_NATIVE_KERNELS=0; callers then use stock torch ops (same results to rounding).
The first call compiles (~1 min here); build ahead of time with
`python -c "from sae_core.sae import native; native.load()"`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

// Rows per task so each task does >= ~64k operations: small problems run inline on one
// thread instead of paying for (and, on a busy machine, waiting at) a parallel region.
static inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_item));
}

// pre: [B, n] float32 -> (vals [B, k] descending, idx [B, k] int64; ties: lower index first).
// Per row: a threshold from a sample of m = max(n/8, 4k) entries (its q-th largest, q ~ 2 k m / n,
// so about 2k entries of the row pass), a branch-free pass collecting the entries >= it, then a
// partial sort of those. If fewer than k pass, the sample's k-th largest is used: it cannot
// exceed the row's k-th largest, so the top-k always passes. ~2 n + O(m) work per row.
std::vector<at::Tensor> topk_rows(at::Tensor pre, int64_t k) {
  TORCH_CHECK(pre.dim() == 2 && pre.scalar_type() == at::kFloat && pre.is_contiguous());
  const int64_t B = pre.size(0), n = pre.size(1);
  TORCH_CHECK(k >= 1 && k <= n);
  const int64_t m = std::min(n, std::max(n / 8, 4 * k));
  const int64_t q = std::min(k, std::max<int64_t>(1, (2 * k * m + n - 1) / n));
  auto vals = at::empty({B, k}, pre.options());
  auto idx = at::empty({B, k}, pre.options().dtype(at::kLong));
  const float* P = pre.data_ptr<float>();
  float* V = vals.data_ptr<float>();
  int64_t* I = idx.data_ptr<int64_t>();
  at::parallel_for(0, B, grain(n), [&](int64_t b0, int64_t b1) {
    std::vector<float> sample(m);
    std::vector<int64_t> cand(n);
    std::vector<std::pair<float, int64_t>> top(n);
    for (int64_t b = b0; b < b1; ++b) {
      const float* p = P + b * n;
      std::copy(p, p + m, sample.begin());
      std::nth_element(sample.begin(), sample.begin() + (q - 1), sample.end(), std::greater<float>());
      // Most 16-entry blocks hold no candidate: test a block with one vectorised OR first.
      auto collect = [&](float thr) {
        int64_t c = 0, j = 0;
        for (; j + 16 <= n; j += 16) {
          int above = 0;
#pragma omp simd reduction(|:above)
          for (int t = 0; t < 16; ++t) above |= (p[j + t] >= thr);
          if (!above) continue;
          for (int t = 0; t < 16; ++t) { cand[c] = j + t; c += (p[j + t] >= thr); }
        }
        for (; j < n; ++j) { cand[c] = j; c += (p[j] >= thr); }
        return c;
      };
      int64_t c = collect(sample[q - 1]);
      if (c < k) {
        std::nth_element(sample.begin(), sample.begin() + (k - 1), sample.end(), std::greater<float>());
        c = collect(sample[k - 1]);
      }
      for (int64_t t = 0; t < c; ++t) top[t] = {p[cand[t]], cand[t]};
      std::partial_sort(top.begin(), top.begin() + k, top.begin() + c, [](const auto& a, const auto& z) {
        return a.first > z.first || (a.first == z.first && a.second < z.second);
      });
      for (int64_t t = 0; t < k; ++t) { V[b * k + t] = top[t].first; I[b * k + t] = top[t].second; }
    }
  });
  return {vals, idx};
}

// out[b] = bias + sum_i vals[b, i] * W[idx[b, i]]. idx, vals: [B, K]; W: [n, d]; bias: [d]
// -> [B, d]. B K d MACs; each output row is built in cache, written once.
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
      float* o = O + b * d;
      std::copy(bp, bp + d, o);
      for (int64_t i = 0; i < K; ++i) {
        const float v = Vv[b * K + i];
        const float* w = Wp + I[b * K + i] * d;
        for (int64_t c = 0; c < d; ++c) o[c] += v * w[c];
      }
    }
  });
  return out;
}

// out[j] = sum over entries e of latent j (CSR rows crow[j]..crow[j+1], entries e = b K + i in
// ascending order) of coef[e] * src[b]. crow: [n+1]; entries: [B K]; coef: [B, K]; src: [B, d]
// -> [n, d]. One thread owns each output row: no atomics, a fixed summation order. B K d MACs.
at::Tensor scatter_rows(at::Tensor crow, at::Tensor entries, int64_t K, at::Tensor coef, at::Tensor src) {
  const int64_t n = crow.size(0) - 1, d = src.size(1);
  auto out = at::empty({n, d}, src.options());
  const int64_t* C = crow.data_ptr<int64_t>();
  const int64_t* E = entries.data_ptr<int64_t>();
  const float* F = coef.data_ptr<float>();
  const float* S = src.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, n, grain(entries.numel() / std::max<int64_t>(1, n) * d), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float* o = O + j * d;
      std::fill(o, o + d, 0.f);
      for (int64_t e = C[j]; e < C[j + 1]; ++e) {
        const float f = F[E[e]];
        const float* s = S + (E[e] / K) * d;
        for (int64_t c = 0; c < d; ++c) o[c] += f * s[c];
      }
    }
  });
  return out;
}

// Entries of idx [B, K] grouped by latent (a stable counting sort): crow [n+1] and entries
// [B K] (flat positions b K + i, ascending within each latent). O(B K + n), single pass each.
std::vector<at::Tensor> csr_by_latent(at::Tensor idx, int64_t n) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous());
  const int64_t nnz = idx.numel();
  auto crow = at::zeros({n + 1}, idx.options());
  auto entries = at::empty({nnz}, idx.options());
  const int64_t* I = idx.data_ptr<int64_t>();
  int64_t* C = crow.data_ptr<int64_t>();
  int64_t* E = entries.data_ptr<int64_t>();
  for (int64_t e = 0; e < nnz; ++e) {
    TORCH_CHECK(I[e] >= 0 && I[e] < n, "latent index out of range");
    ++C[I[e] + 1];
  }
  for (int64_t j = 0; j < n; ++j) C[j + 1] += C[j];
  std::vector<int64_t> fill(C, C + n);
  for (int64_t e = 0; e < nnz; ++e) E[fill[I[e]]++] = e;
  return {crow, entries};
}

// Decoder backward in one pass over the entries grouped by latent: for latent j and each of
// its entries e = b K + i, with g = grad[b] read once for both products:
//   d_vals[e] = <g, W[j]>   and   d_W[j] += vals[e] * g.
// crow: [n+1]; entries: [B K]; vals: [B, K]; W: [n, d]; grad: [B, d] -> (d_vals [B, K], d_W [n, d]).
// 2 B K d MACs; W[j] and d_W[j] stay in cache while the grad rows stream.
std::vector<at::Tensor> decode_backward(at::Tensor crow, at::Tensor entries, int64_t K, at::Tensor vals,
                                        at::Tensor W, at::Tensor grad) {
  const int64_t n = crow.size(0) - 1, d = W.size(1);
  auto d_vals = at::empty(vals.sizes(), vals.options());
  auto d_W = at::empty({n, d}, W.options());
  const int64_t* C = crow.data_ptr<int64_t>();
  const int64_t* E = entries.data_ptr<int64_t>();
  const float* Vv = vals.data_ptr<float>();
  const float* Wp = W.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  float* DV = d_vals.data_ptr<float>();
  float* DW = d_W.data_ptr<float>();
  at::parallel_for(0, n, grain(2 * entries.numel() / std::max<int64_t>(1, n) * d), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* w = Wp + j * d;
      float* o = DW + j * d;
      std::fill(o, o + d, 0.f);
      for (int64_t e = C[j]; e < C[j + 1]; ++e) {
        const float* g = G + (E[e] / K) * d;
        const float v = Vv[E[e]];
        float dot = 0.f;
#pragma omp simd reduction(+:dot)
        for (int64_t c = 0; c < d; ++c) { dot += g[c] * w[c]; }
        for (int64_t c = 0; c < d; ++c) o[c] += v * g[c];
        DV[E[e]] = dot;
      }
    }
  });
  return {d_vals, d_W};
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
      float dot = 0.f;
#pragma omp simd reduction(+:dot)
      for (int64_t c = 0; c < d; ++c) dot += g[c] * w[c];
      for (int64_t c = 0; c < d; ++c) g[c] -= dot * w[c];
    }
  });
}

// normalize: W[j] /= ||W[j]|| (rows of zero norm are left as they are).
void normalize_rows(at::Tensor W) {
  TORCH_CHECK(W.is_contiguous());
  const int64_t n = W.size(0), d = W.size(1);
  float* Wp = W.data_ptr<float>();
  at::parallel_for(0, n, grain(2 * d), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float* w = Wp + j * d;
      float sq = 0.f;
#pragma omp simd reduction(+:sq)
      for (int64_t c = 0; c < d; ++c) sq += w[c] * w[c];
      if (sq > 0.f) {
        const float inv = 1.f / std::sqrt(sq);
        for (int64_t c = 0; c < d; ++c) w[c] *= inv;
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_rows", &project_rows);
  m.def("decode_backward", &decode_backward);
  m.def("normalize_rows", &normalize_rows);
  m.def("csr_by_latent", &csr_by_latent);
  m.def("topk_rows", &topk_rows);
  m.def("gather_sum", &gather_sum);
  m.def("scatter_rows", &scatter_rows);
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


@cache
def load() -> ModuleType | None:
    """The compiled kernels (built once per source version and CPU into torch's extension cache)."""
    if os.environ.get("SAEFLOW_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"saeflow_sparse_kernels_{_cpu_tag()}",
            cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - no compiler/headers: fall back to stock ops
        warnings.warn(
            f"native SAE kernels unavailable ({type(err).__name__}); using stock torch ops",
            stacklevel=2,
        )
        return None
