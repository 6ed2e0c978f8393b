// The kernels' output and scratch tensors: at::empty and at::zeros for CPU tensors, without
// ATen's per-operator headers (<ATen/ops/empty.h> and the like), which took ~2 s of compile time
// in each file that included them, 40% of a kernel file's. Same allocation as at::empty (CPU,
// contiguous, 64-byte aligned).
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>

inline at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_cpu(sizes, options));
}

inline at::Tensor zeros_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_cpu(sizes, options).zero_();
}
