// fastbb_C::empty_like_huge_pages for the CPU (csrc/cpu_alloc.h): the Python side allocates large gradients
// with it (the focal loss's backward).
#include <torch/library.h>

#include "cpu_alloc.h"

namespace fastbb {

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) {
  m.impl("empty_like_huge_pages", &empty_like_huge_pages);
}

}  // namespace fastbb
