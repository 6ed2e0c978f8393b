// Argument checks for the kernels' entry points, the functions Python calls. A kernel trusts
// its pointers, so a wrong dtype, layout or shape would read or write out of bounds; these
// checks read only the tensors' metadata and fail with the kernel, the argument, what it must be
// and what came, e.g. "decode_forward: W must be a contiguous float32 CPU tensor of shape
// [n, d] = [*, 40]; got float64 CPU tensor of shape [96, 40]". TORCH_CHECK builds a message
// only when its check fails.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <initializer_list>
#include <sstream>
#include <string>

// A size that a shape check leaves free (the argument defines it).
constexpr int64_t kAnySize = -1;

// What an argument was: "float64 CPU tensor of shape [96, 40], non-contiguous".
inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::ostringstream s;
  s << c10::getDtypeNames(t.scalar_type()).first << ' ' << c10::DeviceTypeName(t.device().type())
    << " tensor of shape " << t.sizes() << (t.is_contiguous() ? "" : ", non-contiguous");
  return s.str();
}

// What an argument must be: "a contiguous float32 CPU tensor of shape [n, d] = [*, 40]" (the
// sizes that are fixed, if any, after the names).
inline std::string requirement(at::ScalarType dtype, const char* names, std::initializer_list<int64_t> sizes) {
  std::ostringstream s;
  s << "a contiguous " << c10::getDtypeNames(dtype).first << " CPU tensor of shape " << names;
  if (std::any_of(sizes.begin(), sizes.end(), [](int64_t size) { return size != kAnySize; })) {
    const char* sep = " = [";
    for (int64_t size : sizes) {
      s << sep;
      if (size == kAnySize) s << '*';
      else s << size;
      sep = ", ";
    }
    s << ']';
  }
  return s.str();
}

// Whether t is a contiguous CPU tensor of `dtype` with these sizes (kAnySize: any).
inline bool matches_requirement(const at::Tensor& t, at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
  if (!t.defined() || !t.device().is_cpu() || t.scalar_type() != dtype || !t.is_contiguous() ||
      t.dim() != int64_t(sizes.size()))
    return false;
  const int64_t* want = sizes.begin();
  for (int64_t dim = 0; dim < t.dim(); ++dim)
    if (want[dim] != kAnySize && t.size(dim) != want[dim]) return false;
  return true;
}

// fn's argument `arg` must be a contiguous CPU tensor of `dtype` with these sizes, whose names
// ("[B, d]") the message gives.
inline void check_tensor(const char* fn, const char* arg, const at::Tensor& t, at::ScalarType dtype,
                         const char* names, std::initializer_list<int64_t> sizes) {
  TORCH_CHECK(matches_requirement(t, dtype, sizes), fn, ": ", arg, " must be ", requirement(dtype, names, sizes),
              "; got ", describe(t));
}

// The same for an optional argument: empty (left out), or such a tensor.
inline void check_tensor_or_empty(const char* fn, const char* arg, const at::Tensor& t, at::ScalarType dtype,
                                  const char* names, std::initializer_list<int64_t> sizes) {
  TORCH_CHECK(t.defined() && (t.numel() == 0 || matches_requirement(t, dtype, sizes)), fn, ": ", arg,
              " must be empty or ", requirement(dtype, names, sizes), "; got ", describe(t));
}
