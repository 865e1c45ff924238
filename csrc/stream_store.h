// Writing large kernel outputs without reading them first.
//
// A plain store to a line that is not in the cache first reads the line from memory (read for
// ownership), so a kernel that reads N bytes and writes N bytes moves 3N bytes. Non-temporal
// stores write whole lines without reading them: 2N. Kernels whose output is larger than the
// caches compute a row (or a chunk of it) into a small buffer that stays in L1 and copy it out
// with stream_copy; smaller outputs are stored normally, so that their reader finds them cached.
// The streaming stores are SSE2 (x86-64 baseline); elsewhere stream_copy is a memcpy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mmk {

// Outputs of at least this many bytes are written with non-temporal stores (a quarter of a
// typical last-level cache: past it, a written line is evicted before a later kernel reads it).
constexpr size_t kStreamingOutputBytes = size_t{8} << 20;

// Bytes of the cache-resident buffer a streaming kernel computes into before copying out.
constexpr int64_t kStreamChunkBytes = 16384;

inline bool use_streaming_stores(size_t output_bytes) { return output_bytes >= kStreamingOutputBytes; }

// Copies `bytes` from src (cache-resident) to dst with non-temporal stores where dst is 16-byte
// aligned (plain copies for the unaligned head and the tail).
inline void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  size_t head = (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16;
  head = head < bytes ? head : bytes;
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= 16; bytes -= 16, d += 16, s += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  std::memcpy(d, s, bytes);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Orders the non-temporal stores of this thread before its later stores: call once after the
// last stream_copy of a parallel task.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace mmk
