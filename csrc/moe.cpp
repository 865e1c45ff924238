// MoE token permute / unpermute on CPU, for fp32, bf16 and fp16 tokens; sums in fp32.
//
// Index form (slots): indices [T, K] names the expert of slot s = t * K + k. A stable counting
// sort over experts gives every slot its output row, sorted_indices[s] (expert-major, ascending
// slot within an expert); rows >= num_rows are dropped.
//   moe_permute_fwd:   permuted[sorted_indices[s]] = tokens[s / K]            (row order writes)
//   moe_unpermute_fwd: out[t] = sum_k permuted[sorted_indices[t*K+k]] * probs[t, k]  (kept slots)
//   moe_unpermute_bwd: dpermuted[row of s] = dout[t] * probs[s], dprobs[s] = <permuted[row], dout[t]>
// Row form (Megatron's routing map): row r of the permuted tensor holds token row_token[r].
//   moe_sort_routing_map: row_slot[r] = t * E + e, expert-major, ascending token in an expert;
//     with a capacity C >= 0 each expert keeps min(C, T) rows: its routed tokens, then unrouted ones.
//   moe_gather:       out[r] = src[row_token[r]]
//   moe_combine:      out[t] = sum over rows r of token t (ascending r) of src[r] * weight[r]
//   moe_combine_bwd:  dsrc[r] = dout[row_token[r]] * weight[r], dweight[r] = <src[r], dout[row_token[r]]>
// Every input is checked before an output is allocated or written. Each output element is written
// by one task and summed in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "cpu_dispatch.h"
#include "dispatch_types.h"
#include "huge_page_alloc.h"
#include "dtype_convert.h"

namespace mmk {
namespace {

// Rows per parallel task: about this many elements.
constexpr int64_t kMinElemsPerTask = 32768;
// Lanes of the partial sums of a dot product: a fixed summation order on every instruction set.
constexpr int kDotLanes = 16;
// Columns summed together when a token's rows are combined (an fp32 block that stays in L1).
constexpr int64_t kColumnBlock = 512;
// The counting sort keeps one counter per expert up to the largest index; without num_experts that
// index is bounded so that the counters stay proportional to the input.
constexpr int64_t kMinExpertBuckets = int64_t{1} << 16;

template <typename T>
inline __attribute__((always_inline)) void accumulate_span(float* __restrict__ acc, const T* __restrict__ src,
                                                            float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * load_f32(src[i]);
}

template <typename T>
inline __attribute__((always_inline)) void store_span(T* __restrict__ dst, const float* __restrict__ acc,
                                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = store_as<T>(acc[i]);
}

// dst = w * dout; returns <src, dout> summed in kDotLanes fixed lanes.
template <typename T>
inline __attribute__((always_inline)) float scale_dot_span(T* __restrict__ dst, const T* __restrict__ dout,
                                                            const T* __restrict__ src, float w, int64_t n) {
  float lanes[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    for (int j = 0; j < kDotLanes; ++j) {
      const float g = load_f32(dout[i + j]);
      dst[i + j] = store_as<T>(w * g);
      lanes[j] += load_f32(src[i + j]) * g;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float g = load_f32(dout[i]);
    dst[i] = store_as<T>(w * g);
    lanes[j] += load_f32(src[i]) * g;
  }
  float sum = 0.0f;
  for (int j = 0; j < kDotLanes; ++j) sum += lanes[j];
  return sum;
}

// One clone set per dtype: target_clones does not apply to templates.
MMK_VECTORIZED void accumulate_row(float* acc, const float* src, float w, int64_t n) { accumulate_span(acc, src, w, n); }
MMK_VECTORIZED void accumulate_row(float* acc, const c10::BFloat16* src, float w, int64_t n) {
  accumulate_span(acc, src, w, n);
}
MMK_VECTORIZED void accumulate_row(float* acc, const c10::Half* src, float w, int64_t n) {
  accumulate_span(acc, src, w, n);
}

MMK_VECTORIZED void store_row(float* dst, const float* acc, int64_t n) { store_span(dst, acc, n); }
MMK_VECTORIZED void store_row(c10::BFloat16* dst, const float* acc, int64_t n) { store_span(dst, acc, n); }
MMK_VECTORIZED void store_row(c10::Half* dst, const float* acc, int64_t n) { store_span(dst, acc, n); }

MMK_VECTORIZED float scale_dot_row(float* dst, const float* dout, const float* src, float w, int64_t n) {
  return scale_dot_span(dst, dout, src, w, n);
}
MMK_VECTORIZED float scale_dot_row(c10::BFloat16* dst, const c10::BFloat16* dout, const c10::BFloat16* src,
                                   float w, int64_t n) {
  return scale_dot_span(dst, dout, src, w, n);
}
MMK_VECTORIZED float scale_dot_row(c10::Half* dst, const c10::Half* dout, const c10::Half* src, float w,
                                   int64_t n) {
  return scale_dot_span(dst, dout, src, w, n);
}

int64_t row_grain(int64_t hidden) { return std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(hidden, 1)); }

// out[t] = sum of src[row] * weight over the entries (row, weight) = entry(j), j in span(t) = [begin, end),
// with rows >= `rows` skipped; summed in fp32 in entry order, one task per token. Columns go in blocks so
// that the rows of a token are read side by side.
template <typename T, typename SpanFn, typename EntryFn>
void sum_rows_per_token(const T* src, int64_t rows, int64_t hidden, int64_t num_tokens, int64_t grain, T* out,
                        SpanFn span, EntryFn entry) {
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    float acc[kColumnBlock];
    std::vector<std::pair<const T*, float>> kept;
    for (int64_t t = begin; t < end; ++t) {
      kept.clear();
      const auto [first, last] = span(t);
      for (int64_t j = first; j < last; ++j) {
        const auto [row, weight] = entry(j);
        if (row < rows) kept.emplace_back(src + row * hidden, weight);
      }
      for (int64_t col = 0; col < hidden; col += kColumnBlock) {
        const int64_t len = std::min(kColumnBlock, hidden - col);
        std::fill(acc, acc + len, 0.0f);
        for (const auto& [row_ptr, weight] : kept) accumulate_row(acc, row_ptr + col, weight, len);
        store_row(out + t * hidden + col, acc, len);
      }
    }
  });
}

struct Pair {
  int64_t row;
  int64_t token;
  float weight;
};

// For each pair i in [0, n) with pair(i).row < rows: dsrc[row] = dout[token] * weight and, when dweight is
// given, dweight[i] = <src[row], dout[token]>. Each row must belong to at most one pair.
template <typename T, typename PairFn>
void scale_dot_pairs(const T* dout, const T* src, int64_t n, int64_t rows, int64_t hidden, T* dsrc, float* dweight,
                     PairFn pair) {
  at::parallel_for(0, n, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Pair p = pair(i);
      if (p.row >= rows) continue;
      const float dot = scale_dot_row(dsrc + p.row * hidden, dout + p.token * hidden, src + p.row * hidden, p.weight, hidden);
      if (dweight) dweight[i] = dot;
    }
  });
}

// ---- input checks -------------------------------------------------------------------------

void check_tokens(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                   "mm_kernels_cpu::", op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, "mm_kernels_cpu::", op, ": ", name, " must have shape [rows, H], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "mm_kernels_cpu::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// Index tensors (int32 or int64) as contiguous int64.
at::Tensor index_as_long(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "mm_kernels_cpu::", op, ": ", name,
                   " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "mm_kernels_cpu::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  return t.to(at::kLong).contiguous();
}

// Weights (probs) as a contiguous fp32 tensor of `numel` elements.
at::Tensor weights_as_float(const char* op, const char* name, const at::Tensor& w, int64_t numel) {
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), "mm_kernels_cpu::", op, ": ", name,
                   " must be a floating-point tensor, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.numel() == numel, "mm_kernels_cpu::", op, ": ", name, " must have ", numel,
                    " elements, got shape ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), "mm_kernels_cpu::", op, ": ", name, " must be a CPU tensor, got ", w.device());
  return w.to(at::kFloat).contiguous();
}

void check_range(const char* op, const char* name, const int64_t* values, int64_t n, int64_t bound) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(values[i] >= 0 && values[i] < bound, "mm_kernels_cpu::", op, ": ", name, "[", i, "] = ",
                      values[i], " is outside [0, ", bound, ")");
  }
}

// Checks that sorted_indices is a permutation of [0, n): every row is then written exactly once.
void check_permutation(const char* op, const int64_t* sorted, int64_t n) {
  check_range(op, "sorted_indices", sorted, n, n);
  std::vector<uint8_t> seen(n, 0);
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK_VALUE(!seen[sorted[s]], "mm_kernels_cpu::", op, ": sorted_indices is not a permutation (row ",
                      sorted[s], " appears twice); pass the sorted_indices returned by moe_permute");
    seen[sorted[s]] = 1;
  }
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, int64_t rows) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == ref.size(1), "mm_kernels_cpu::", op, ": ", name,
                    " must have shape [", rows, ", ", ref.size(1), "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "mm_kernels_cpu::", op, ": ", name, " must be ",
                   ref.scalar_type(), ", got ", t.scalar_type());
}

// ---- index form ---------------------------------------------------------------------------

// Stable counting sort of the slots by expert: sorted[s] = output row of slot s; for kept rows
// (row < num_rows) row_token[row] = s / topk.
void counting_sort(const int64_t* experts, int64_t slots, int64_t buckets, int64_t topk, int64_t num_rows,
                   int32_t* sorted, int64_t* row_token) {
  std::vector<int64_t> next(buckets + 1, 0);
  for (int64_t s = 0; s < slots; ++s) ++next[experts[s] + 1];
  for (int64_t e = 0; e < buckets; ++e) next[e + 1] += next[e];
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t row = next[experts[s]]++;
    sorted[s] = static_cast<int32_t>(row);
    if (row < num_rows) row_token[row] = s / topk;
  }
}

template <typename T>
void gather_rows(const T* src, const int64_t* row_token, int64_t rows, int64_t hidden, T* out) {
  at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(out + r * hidden, src + row_token[r] * hidden, hidden * sizeof(T));
  });
}

std::tuple<at::Tensor, at::Tensor> moe_permute_fwd(const at::Tensor& tokens_in, const at::Tensor& indices_in,
                                               int64_t num_rows, int64_t num_experts) {
  constexpr const char* op = "moe_permute_fwd";
  check_tokens(op, "tokens", tokens_in);
  TORCH_CHECK_VALUE(indices_in.dim() == 2 && indices_in.size(0) == tokens_in.size(0), "mm_kernels_cpu::", op,
                    ": indices must have shape [T, K] with T = ", tokens_in.size(0), ", got ", indices_in.sizes());
  const at::Tensor indices = index_as_long(op, "indices", indices_in);
  const int64_t slots = indices.numel();
  TORCH_CHECK_VALUE(num_rows >= 0 && num_rows <= slots, "mm_kernels_cpu::", op, ": num_rows must be in [0, ",
                    slots, "], got ", num_rows);
  TORCH_CHECK_VALUE(slots <= std::numeric_limits<int32_t>::max(), "mm_kernels_cpu::", op, ": T * K = ", slots,
                    " does not fit the int32 sorted_indices");
  const int64_t* experts = indices.const_data_ptr<int64_t>();
  check_range(op, "indices", experts, slots, num_experts >= 0 ? num_experts : std::max(kMinExpertBuckets, slots));
  const int64_t buckets = slots == 0 ? 0 : *std::max_element(experts, experts + slots) + 1;
  const at::Tensor tokens = tokens_in.contiguous();
  const int64_t hidden = tokens.size(1);
  at::Tensor sorted = at::empty({slots}, indices.options().dtype(at::kInt));
  std::vector<int64_t> row_token(num_rows);
  counting_sort(experts, slots, buckets, std::max<int64_t>(indices.size(1), 1), num_rows,
                sorted.mutable_data_ptr<int32_t>(), row_token.data());
  at::Tensor permuted = empty_huge_page_advised({num_rows, hidden}, tokens.options());
  MMK_DISPATCH_FLOAT_TYPES(tokens.scalar_type(), "mm_kernels_cpu::moe_permute_fwd", [&] {
    gather_rows(tokens.const_data_ptr<scalar_t>(), row_token.data(), num_rows, hidden,
                permuted.mutable_data_ptr<scalar_t>());
  });
  return {permuted, sorted};
}

at::Tensor moe_unpermute_fwd(const at::Tensor& permuted_in, const at::Tensor& sorted_in,
                         const std::optional<at::Tensor>& probs_in, int64_t num_tokens) {
  constexpr const char* op = "moe_unpermute_fwd";
  check_tokens(op, "permuted", permuted_in);
  const at::Tensor sorted = index_as_long(op, "sorted_indices", sorted_in);
  const int64_t slots = sorted.numel();
  TORCH_CHECK_VALUE(num_tokens >= 0 && (num_tokens == 0 ? slots == 0 : slots % num_tokens == 0),
                    "mm_kernels_cpu::", op, ": sorted_indices has ", slots, " slots, not a multiple of ", num_tokens,
                    " tokens");
  TORCH_CHECK_VALUE(permuted_in.size(0) <= slots, "mm_kernels_cpu::", op, ": permuted has ", permuted_in.size(0),
                    " rows, more than the ", slots, " slots of sorted_indices");
  check_permutation(op, sorted.const_data_ptr<int64_t>(), slots);
  std::optional<at::Tensor> probs;
  if (probs_in) probs = weights_as_float(op, "probs", *probs_in, slots);
  const at::Tensor permuted = permuted_in.contiguous();
  const int64_t rows = permuted.size(0);
  const int64_t hidden = permuted.size(1);
  const int64_t topk = num_tokens == 0 ? 0 : slots / num_tokens;
  at::Tensor out = empty_huge_page_advised({num_tokens, hidden}, permuted.options());
  const int64_t* row_of = sorted.const_data_ptr<int64_t>();
  const float* w = probs ? probs->const_data_ptr<float>() : nullptr;
  MMK_DISPATCH_FLOAT_TYPES(permuted.scalar_type(), "mm_kernels_cpu::moe_unpermute_fwd", [&] {
    sum_rows_per_token(permuted.const_data_ptr<scalar_t>(), rows, hidden, num_tokens,
                       row_grain(hidden * std::max<int64_t>(topk, 1)), out.mutable_data_ptr<scalar_t>(),
                       [&](int64_t t) { return std::pair{t * topk, (t + 1) * topk}; },
                       [&](int64_t s) { return std::pair{row_of[s], w ? w[s] : 1.0f}; });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd(const at::Tensor& dout_in, const at::Tensor& permuted_in,
                                                     const at::Tensor& sorted_in,
                                                     const std::optional<at::Tensor>& probs_in) {
  constexpr const char* op = "moe_unpermute_bwd";
  check_tokens(op, "permuted", permuted_in);
  check_tokens(op, "dout", dout_in);
  const at::Tensor sorted = index_as_long(op, "sorted_indices", sorted_in);
  const int64_t slots = sorted.numel();
  const int64_t num_tokens = dout_in.size(0);
  TORCH_CHECK_VALUE(num_tokens == 0 ? slots == 0 : slots % num_tokens == 0, "mm_kernels_cpu::", op,
                    ": sorted_indices has ", slots, " slots, not a multiple of ", num_tokens, " tokens");
  check_same(op, "dout", dout_in, permuted_in, num_tokens);
  TORCH_CHECK_VALUE(permuted_in.size(0) <= slots, "mm_kernels_cpu::", op, ": permuted has ", permuted_in.size(0),
                    " rows, more than the ", slots, " slots of sorted_indices");
  check_permutation(op, sorted.const_data_ptr<int64_t>(), slots);
  std::optional<at::Tensor> probs;
  if (probs_in) probs = weights_as_float(op, "probs", *probs_in, slots);
  const at::Tensor permuted = permuted_in.contiguous();
  const at::Tensor dout = dout_in.contiguous();
  const int64_t rows = permuted.size(0);
  const int64_t hidden = permuted.size(1);
  const int64_t topk = num_tokens == 0 ? 0 : slots / num_tokens;
  at::Tensor dpermuted = empty_huge_page_advised({rows, hidden}, permuted.options());
  at::Tensor dprobs = at::zeros({probs ? slots : 0}, at::kFloat);
  const int64_t* row_of = sorted.const_data_ptr<int64_t>();
  const float* w = probs ? probs->const_data_ptr<float>() : nullptr;
  float* dw = probs ? dprobs.mutable_data_ptr<float>() : nullptr;
  MMK_DISPATCH_FLOAT_TYPES(permuted.scalar_type(), "mm_kernels_cpu::moe_unpermute_bwd", [&] {
    scale_dot_pairs(dout.const_data_ptr<scalar_t>(), permuted.const_data_ptr<scalar_t>(), slots, rows, hidden,
                    dpermuted.mutable_data_ptr<scalar_t>(), dw,
                    [&](int64_t s) { return Pair{row_of[s], s / topk, w ? w[s] : 1.0f}; });
  });
  if (probs_in) return {dpermuted, dprobs.to(probs_in->scalar_type()).view(probs_in->sizes())};
  return {dpermuted, at::empty({0}, permuted.options())};
}

// ---- row form (routing map) ---------------------------------------------------------------

at::Tensor moe_sort_routing_map(const at::Tensor& map_in, int64_t capacity) {
  constexpr const char* op = "moe_sort_routing_map";
  TORCH_CHECK_TYPE(map_in.scalar_type() == at::kBool, "mm_kernels_cpu::", op, ": routing_map must be bool, got ",
                   map_in.scalar_type());
  TORCH_CHECK_VALUE(map_in.dim() == 2, "mm_kernels_cpu::", op, ": routing_map must have shape [T, E], got ",
                    map_in.sizes());
  TORCH_CHECK(map_in.device().is_cpu(), "mm_kernels_cpu::", op, ": routing_map must be a CPU tensor");
  const at::Tensor map = map_in.contiguous();
  const int64_t tokens = map.size(0);
  const int64_t experts = map.size(1);
  const bool* routed = map.const_data_ptr<bool>();
  // Rows per expert, then the first row of each expert.
  std::vector<int64_t> first(experts + 1, 0);
  at::parallel_for(0, experts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      int64_t count = 0;
      for (int64_t t = 0; t < tokens; ++t) count += routed[t * experts + e];
      first[e + 1] = capacity < 0 ? count : std::min(capacity, tokens);
    }
  });
  for (int64_t e = 0; e < experts; ++e) first[e + 1] += first[e];
  at::Tensor row_slot = at::empty({first[experts]}, map.options().dtype(at::kLong));
  int64_t* slot = row_slot.mutable_data_ptr<int64_t>();
  at::parallel_for(0, experts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      int64_t row = first[e];
      // Routed tokens first; with a capacity, unrouted tokens pad the expert up to it.
      for (bool want : {true, false}) {
        for (int64_t t = 0; t < tokens && row < first[e + 1]; ++t) {
          if (routed[t * experts + e] == want) slot[row++] = t * experts + e;
        }
      }
    }
  });
  return row_slot;
}

at::Tensor moe_gather(const at::Tensor& src_in, const at::Tensor& row_token_in) {
  constexpr const char* op = "moe_gather";
  check_tokens(op, "src", src_in);
  const at::Tensor row_token = index_as_long(op, "row_token", row_token_in);
  check_range(op, "sorted_indices (token rows)", row_token.const_data_ptr<int64_t>(), row_token.numel(), src_in.size(0));
  const at::Tensor src = src_in.contiguous();
  at::Tensor out = empty_huge_page_advised({row_token.numel(), src.size(1)}, src.options());
  MMK_DISPATCH_FLOAT_TYPES(src.scalar_type(), "mm_kernels_cpu::moe_gather", [&] {
    gather_rows(src.const_data_ptr<scalar_t>(), row_token.const_data_ptr<int64_t>(), row_token.numel(), src.size(1),
                out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor moe_combine(const at::Tensor& src_in, const at::Tensor& row_token_in,
                       const std::optional<at::Tensor>& weight_in, int64_t num_tokens) {
  constexpr const char* op = "moe_combine";
  check_tokens(op, "src", src_in);
  const at::Tensor row_token = index_as_long(op, "row_token", row_token_in);
  const int64_t rows = src_in.size(0);
  TORCH_CHECK_VALUE(row_token.numel() == rows, "mm_kernels_cpu::", op, ": row_token must have ", rows,
                    " elements (the rows of src), got ", row_token.numel());
  TORCH_CHECK_VALUE(num_tokens >= 0, "mm_kernels_cpu::", op, ": num_tokens must be >= 0, got ", num_tokens);
  const int64_t* token_of = row_token.const_data_ptr<int64_t>();
  check_range(op, "sorted_indices (token rows)", token_of, rows, num_tokens);
  std::optional<at::Tensor> weight;
  if (weight_in) weight = weights_as_float(op, "row_weight", *weight_in, rows);
  // Rows of each token, ascending (counting sort by token): first[t] .. first[t + 1] in order.
  std::vector<int64_t> first(num_tokens + 1, 0);
  std::vector<int64_t> order(rows);
  for (int64_t r = 0; r < rows; ++r) ++first[token_of[r] + 1];
  for (int64_t t = 0; t < num_tokens; ++t) first[t + 1] += first[t];
  {
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t r = 0; r < rows; ++r) order[next[token_of[r]]++] = r;
  }
  const at::Tensor src = src_in.contiguous();
  const int64_t hidden = src.size(1);
  at::Tensor out = empty_huge_page_advised({num_tokens, hidden}, src.options());
  const float* w = weight ? weight->const_data_ptr<float>() : nullptr;
  MMK_DISPATCH_FLOAT_TYPES(src.scalar_type(), "mm_kernels_cpu::moe_combine", [&] {
    sum_rows_per_token(src.const_data_ptr<scalar_t>(), rows, hidden, num_tokens, row_grain(hidden),
                       out.mutable_data_ptr<scalar_t>(), [&](int64_t t) { return std::pair{first[t], first[t + 1]}; },
                       [&](int64_t j) { return std::pair{order[j], w ? w[order[j]] : 1.0f}; });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_bwd(const at::Tensor& dout_in, const at::Tensor& src_in,
                                                   const at::Tensor& row_token_in,
                                                   const std::optional<at::Tensor>& weight_in) {
  constexpr const char* op = "moe_combine_bwd";
  check_tokens(op, "src", src_in);
  check_tokens(op, "dout", dout_in);
  check_same(op, "dout", dout_in, src_in, dout_in.size(0));
  const at::Tensor row_token = index_as_long(op, "row_token", row_token_in);
  const int64_t rows = src_in.size(0);
  TORCH_CHECK_VALUE(row_token.numel() == rows, "mm_kernels_cpu::", op, ": row_token must have ", rows,
                    " elements (the rows of src), got ", row_token.numel());
  const int64_t* token_of = row_token.const_data_ptr<int64_t>();
  check_range(op, "sorted_indices (token rows)", token_of, rows, dout_in.size(0));
  std::optional<at::Tensor> weight;
  if (weight_in) weight = weights_as_float(op, "row_weight", *weight_in, rows);
  const at::Tensor src = src_in.contiguous();
  const at::Tensor dout = dout_in.contiguous();
  const int64_t hidden = src.size(1);
  at::Tensor dsrc = empty_huge_page_advised({rows, hidden}, src.options());
  at::Tensor dweight = at::empty({weight ? rows : 0}, at::kFloat);
  const float* w = weight ? weight->const_data_ptr<float>() : nullptr;
  float* dw = weight ? dweight.mutable_data_ptr<float>() : nullptr;
  MMK_DISPATCH_FLOAT_TYPES(src.scalar_type(), "mm_kernels_cpu::moe_combine_bwd", [&] {
    scale_dot_pairs(dout.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), rows, rows, hidden,
                    dsrc.mutable_data_ptr<scalar_t>(), dw,
                    [&](int64_t r) { return Pair{r, token_of[r], w ? w[r] : 1.0f}; });
  });
  if (weight_in) return {dsrc, dweight.to(weight_in->scalar_type())};
  return {dsrc, at::empty({0}, src.options())};
}

}  // namespace
}  // namespace mmk

TORCH_LIBRARY_FRAGMENT(mm_kernels_cpu, m) {
  m.def("moe_permute_fwd(Tensor tokens, Tensor indices, int num_rows, int num_experts) -> (Tensor, Tensor)");
  m.def("moe_unpermute_fwd(Tensor permuted, Tensor sorted_indices, Tensor? probs, int num_tokens) -> Tensor");
  m.def("moe_unpermute_bwd(Tensor dout, Tensor permuted, Tensor sorted_indices, Tensor? probs) -> (Tensor, Tensor)");
  m.def("moe_sort_routing_map(Tensor routing_map, int capacity) -> Tensor");
  m.def("moe_gather(Tensor src, Tensor row_token) -> Tensor");
  m.def("moe_combine(Tensor src, Tensor row_token, Tensor? row_weight, int num_tokens) -> Tensor");
  m.def("moe_combine_bwd(Tensor dout, Tensor src, Tensor row_token, Tensor? row_weight) -> (Tensor, Tensor)");
}

// Registers the kernels into the library m: the operators of mm_kernels_cpu (defined above) and the
// CPU kernels of the mm_kernels operators (defined by mm_kernels.contract) share names.
namespace {

void register_moe_kernels(torch::Library& m) {
  m.impl("moe_permute_fwd", &mmk::moe_permute_fwd);
  m.impl("moe_unpermute_fwd", &mmk::moe_unpermute_fwd);
  m.impl("moe_unpermute_bwd", &mmk::moe_unpermute_bwd);
  m.impl("moe_sort_routing_map", &mmk::moe_sort_routing_map);
  m.impl("moe_gather", &mmk::moe_gather);
  m.impl("moe_combine", &mmk::moe_combine);
  m.impl("moe_combine_bwd", &mmk::moe_combine_bwd);
}

}  // namespace

TORCH_LIBRARY_IMPL(mm_kernels_cpu, CPU, m) { register_moe_kernels(m); }

TORCH_LIBRARY_IMPL(mm_kernels, CPU, m) { register_moe_kernels(m); }
