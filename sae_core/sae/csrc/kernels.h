// The kernels' entry points, the functions `bindings.cpp` hands to Python. Each is defined, with
// its shapes, cost and outputs, in the file named beside it; each checks its arguments first
// (checks.h). All tensors are CPU; floats are float32, indices int64.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

// topk.cpp: row-wise top-k of pre + bias.
std::vector<at::Tensor> topk_rows(at::Tensor pre, int64_t k, at::Tensor bias);

// gather_sum.cpp: the inference decoder, bias + sum_i vals[b, i] W[idx[b, i]].
at::Tensor gather_sum(at::Tensor idx, at::Tensor vals, at::Tensor W, at::Tensor bias);

// decode.cpp: the training decoder, its residuals and the dots its backward needs.
std::vector<at::Tensor> decode_forward(at::Tensor xc, at::Tensor b_pre, at::Tensor W, at::Tensor idx,
                                       at::Tensor acts, int64_t k, int64_t k_main, bool with_recon,
                                       int64_t path, at::Tensor rows, at::Tensor W_panels);

// weight_grads.cpp: both weight gradients of the sparse step, latent by latent.
std::vector<at::Tensor> weight_grads(at::Tensor idx, int64_t n, int64_t k, int64_t k_main, at::Tensor rows,
                                     at::Tensor acts, at::Tensor pre, at::Tensor dots, at::Tensor head,
                                     double c_main, double c_multi, double c_aux, int64_t d, bool want_dpre);

// counts.cpp: how many entries of each latent fire.
at::Tensor fire_counts(at::Tensor idx, at::Tensor vals, int64_t n, double threshold);

// normalize.cpp: per-token normalisation.
std::vector<at::Tensor> normalize_tokens(at::Tensor x, double eps, at::Tensor offset);

// optimizer.cpp: the unit-norm decoder's rows: projection, normalisation, its Adam step.
void project_rows(at::Tensor W, at::Tensor G);
void normalize_rows(at::Tensor W);
void adam_unit_rows(at::Tensor W, at::Tensor G, at::Tensor m, at::Tensor v, at::Tensor panels_out,
                    double step_size, double beta1, double beta2, double eps, double bc2_sqrt);
