// Allocation of large kernel outputs.
//
// A fresh multi-megabyte CPU tensor is faulted in page by page on first write, and the
// kernel zeroes every page; on a virtual machine a 64 MiB activation (16k 4 KiB faults)
// costs more than twice the time to copy it. Kernels allocate their large outputs with
// empty_output instead:
// - blocks of at least 2 MiB are 2 MiB aligned and advised MADV_HUGEPAGE (one fault per
//   2 MiB, as torch does for every allocation under THP_MEM_ALLOC_ENABLE=1);
// - freed blocks are kept, up to kCachedBytesLimit in all, and handed out again for a
//   request of the same rounded size, so a training loop that allocates the same
//   activation sizes every step reuses memory that is already mapped.
// Smaller outputs come from the default CPU allocator.
#pragma once

#include <cstddef>

#include <ATen/core/Tensor.h>

namespace mmk {

// Upper bound on the bytes of freed blocks kept for reuse.
constexpr size_t kCachedBytesLimit = size_t{256} << 20;

// An uninitialised contiguous CPU tensor of the given sizes and dtype.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Bytes currently held in freed blocks for reuse (for tests).
size_t cached_output_bytes();

}  // namespace mmk
