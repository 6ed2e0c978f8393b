// The training decoder's row-by-row layout (decode_rows.cpp), which `decode_forward` takes for
// a W whose panels do not fit in L2 (or when told to).
#pragma once

#include <ATen/core/Tensor.h>

// Fills recon (optional: [0, d] for none), rows, dots and head (empty without multi-TopK) as
// `decode_forward` describes; returns sq [B, 4], each token's squares. colsum_g: [NG, 3, P*16]
// zeros, filled with the column sums of NG fixed token groups. The arguments are checked by
// `decode_forward`. ~2 B K d MACs; each token's B K gathered rows of W read whole (from L3 or
// memory) once, xc read once, rows, dots and recon written once.
at::Tensor decode_by_rows(const at::Tensor& xc, const at::Tensor& b_pre, const at::Tensor& W, const at::Tensor& idx,
                          const at::Tensor& acts, int64_t k, int64_t k_main, at::Tensor& recon, at::Tensor& rows,
                          at::Tensor& dots, at::Tensor& head, at::Tensor& colsum_g, int64_t NG);
