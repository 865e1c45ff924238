// Output allocation for streaming kernels: large tensors backed by transparent huge pages.
//
// A large at::empty gets fresh pages from the kernel, and a kernel that writes it once pays a
// page fault per 4 KiB page (about as much time as the writes themselves). Advising the
// allocation for huge pages before the first write makes that one fault per 2 MiB. This is what
// torch's THP_MEM_ALLOC_ENABLE=1 does for every allocation; here only for kernel outputs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmk {

// at::empty(sizes, options), advised for transparent huge pages when it spans 4 MiB or more.
inline at::Tensor empty_huge_page_advised(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (out.nbytes() >= 2 * kHugePage && last > first) {
    // Advice only: on failure the pages stay small.
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace mmk
