// The Python module: each kernel under its own name (kernels.h lists them; each checks its
// arguments). Compile time: this file includes only torch's pybind11 glue (the at::Tensor
// casters), not <torch/extension.h>, whose C++ frontend took 26 s of CPU here against 9; the
// kernel files include just the ATen headers they use (alloc.h).
#include <torch/csrc/utils/pybind.h>

#include "kernels.h"
#include "panels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_rows", &project_rows);
  m.def("normalize_rows", &normalize_rows);
  m.def("topk_rows", &topk_rows);
  m.def("gather_sum", &gather_sum);
  m.def("decode_forward", &decode_forward);
  m.def("weight_grads", &weight_grads);
  m.def("adam_unit_rows", &adam_unit_rows);
  m.def("panels_fit_l2", &panels_fit_l2);
  m.def("fire_counts", &fire_counts);
  m.def("normalize_tokens", &normalize_tokens);
}
