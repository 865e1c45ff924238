#include "huge_page_alloc.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

namespace mmk {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

struct Block {
  void* ptr;
  size_t bytes;
};

// Freed blocks, oldest first. Never destroyed: tensors may be freed during static destruction.
class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* ptr = it->ptr;
        cached_bytes_ -= bytes;
        blocks_.erase(std::next(it).base());
        return ptr;
      }
    }
    return nullptr;
  }

  void give(Block block) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (block.bytes > kCachedBytesLimit) {
      std::free(block.ptr);
      return;
    }
    while (cached_bytes_ + block.bytes > kCachedBytesLimit) {
      std::free(blocks_.front().ptr);
      cached_bytes_ -= blocks_.front().bytes;
      blocks_.pop_front();
    }
    blocks_.push_back(block);
    cached_bytes_ += block.bytes;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  std::mutex mutex_;
  std::deque<Block> blocks_;
  size_t cached_bytes_ = 0;
};

BlockCache& cache() {
  static BlockCache* instance = new BlockCache();
  return *instance;
}

void release_block(void* context) {
  Block* block = static_cast<Block*>(context);
  cache().give(*block);
  delete block;
}

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kHugePage) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = cache().take(bytes);
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(kHugePage, bytes);
      TORCH_CHECK(ptr != nullptr, "empty_huge_page_advised: out of memory allocating ", nbytes, " bytes");
#ifdef MADV_HUGEPAGE
      madvise(ptr, bytes, MADV_HUGEPAGE);  // a hint: without THP the block still works with 4 KiB pages
#endif
    }
    return {ptr, new Block{ptr, bytes}, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  // Blocks come from two allocators with different deleters.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

}  // namespace

at::Tensor empty_huge_page_advised(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_huge_page_advised: CPU tensors only, got ", options.device());
  static OutputAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

size_t cached_output_bytes() { return cache().cached_bytes(); }

}  // namespace mmk
