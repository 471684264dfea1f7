// Large CPU outputs whose memory is advised onto transparent huge pages before its first write.
//
// A fresh allocation of tens of MB (glibc maps it anew) is faulted in 4 KiB at a time by the first write: the
// focal loss's gradient of 8 x 49,104 x 91 floats (143 MB) took 41 ms to allocate and fill on a 2-core VM,
// nearly all of it page faults, where writing into memory already mapped takes 5 ms. With MADV_HUGEPAGE
// (honoured where /sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise") the kernel maps it 2 MiB
// at a time: 9 ms. The advice is only advice: where it is refused or unsupported, nothing changes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastbb {

// Outputs of at least this many bytes get the advice (smaller ones gain little next to the kernel's work).
constexpr int64_t kHugePageAdviceMinBytes = int64_t(8) << 20;

inline void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (!t.device().is_cpu() || static_cast<int64_t>(t.nbytes()) < kHugePageAdviceMinBytes) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);  // the whole 2 MiB pages inside
  const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty_like(t), contiguous, advised onto huge pages when large.
inline at::Tensor empty_like_huge_pages(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t, at::MemoryFormat::Contiguous);
  advise_huge_pages(out);
  return out;
}

}  // namespace fastbb
