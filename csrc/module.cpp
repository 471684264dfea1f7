// The Python module fastbb._C. Kernels register themselves with the dispatcher (TORCH_LIBRARY_IMPL on
// the private namespace fastbb_C; the schemas are defined in Python, fastbb/ops/*.py); this file only
// reports how the binary was built.
#include <torch/extension.h>

#ifndef FASTBB_TORCH_VERSION
#define FASTBB_TORCH_VERSION "unknown"
#endif

namespace {
bool with_cuda() {
#ifdef FASTBB_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("with_openmp", &with_openmp, "Whether the CPU kernels were compiled with OpenMP.");
  m.attr("torch_version") = FASTBB_TORCH_VERSION;
}
