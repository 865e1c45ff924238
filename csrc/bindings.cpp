// Python module mm_kernels._C. Kernels register themselves as torch operators in the
// `mm_kernels_cpu` namespace (TORCH_LIBRARY_FRAGMENT in each csrc/<op>.cpp); importing
// this module loads them. The module itself only reports build facts.
#include <torch/extension.h>

#include "cpu_dispatch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mm-kernels CPU kernels (operators in torch.ops.mm_kernels_cpu)";
  m.def("selected_isa", &mmk::selected_isa, "Instruction-set level the vectorised kernels run with");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
