// Kernel output allocation: huge-page aligned large blocks, reuse of freed blocks, the cache bound.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "check.h"
#include "huge_page_alloc.h"

namespace {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

MMK_TEST(tensors_have_the_requested_shape_and_dtype) {
  const at::Tensor small = mmk::empty_huge_page_advised({3, 5}, at::TensorOptions().dtype(at::kHalf));
  MMK_CHECK(small.sizes() == at::IntArrayRef({3, 5}) && small.scalar_type() == at::kHalf && small.is_contiguous());
  const at::Tensor large = mmk::empty_huge_page_advised({1024, 1024}, at::TensorOptions().dtype(at::kBFloat16));
  MMK_CHECK(large.scalar_type() == at::kBFloat16 && large.is_cpu() && large.is_contiguous());
  MMK_CHECK(reinterpret_cast<uintptr_t>(large.data_ptr()) % kHugePage == 0);
  large.fill_(1.5);
  MMK_CHECK(large.sum().item<double>() == 1.5 * 1024 * 1024);
}

MMK_TEST(a_freed_block_is_reused_for_the_same_size) {
  const std::vector<int64_t> sizes = {1024, 1024};  // 4 MiB of fp32
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const void* first = nullptr;
  {
    const at::Tensor a = mmk::empty_huge_page_advised(sizes, options);
    first = a.data_ptr();
  }
  MMK_CHECK(mmk::cached_output_bytes() >= (size_t{4} << 20));
  const at::Tensor b = mmk::empty_huge_page_advised(sizes, options);
  MMK_CHECK(b.data_ptr() == first);
  const at::Tensor c = mmk::empty_huge_page_advised(sizes, options);
  MMK_CHECK(c.data_ptr() != b.data_ptr());
}

MMK_TEST(the_cache_stays_within_its_bound) {
  const auto options = at::TensorOptions().dtype(at::kByte);
  const int64_t block = static_cast<int64_t>(mmk::kCachedBytesLimit / 3);
  for (int i = 0; i < 8; ++i) {
    std::vector<at::Tensor> live;
    for (int j = 0; j < 4; ++j) live.push_back(mmk::empty_huge_page_advised({block + j * 4096}, options));
  }
  MMK_CHECK(mmk::cached_output_bytes() <= mmk::kCachedBytesLimit);
  MMK_CHECK(mmk::cached_output_bytes() > 0);
}

}  // namespace

MMK_TEST_MAIN()
