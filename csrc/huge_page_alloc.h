// Output allocation for streaming kernels: large tensors on transparent huge pages, reused.
//
// A large at::empty gets fresh pages from the kernel, and a kernel that writes it once pays a
// page fault per 4 KiB page plus the kernel zeroing the page (here a 64 MiB output costs more
// than twice the time to copy it). Kernel outputs are allocated here instead:
// - blocks of 2 MiB or more are 2 MiB aligned and advised MADV_HUGEPAGE (one fault per 2 MiB,
//   as torch's THP_MEM_ALLOC_ENABLE=1 does for every allocation);
// - freed blocks are kept, up to kCachedBytesLimit in all (oldest released first), and handed
//   out again for a request of the same rounded size: a training step allocates the same
//   activation sizes every iteration and gets memory that is already mapped.
// Smaller outputs come from the default CPU allocator.
#pragma once

#include <cstddef>

#include <ATen/core/Tensor.h>

namespace mmk {

// Upper bound on the bytes of freed blocks kept for reuse.
constexpr size_t kCachedBytesLimit = size_t{256} << 20;

// Like at::empty(sizes, options) for a CPU tensor: uninitialised, contiguous.
at::Tensor empty_huge_page_advised(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes currently held in freed blocks for reuse.
size_t cached_output_bytes();

}  // namespace mmk
