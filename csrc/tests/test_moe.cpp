// C++ tests of the MoE permute / unpermute operators (mm_kernels_cpu::moe_*), called through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

#include "check.h"

namespace {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

auto op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

TensorPair permute(const at::Tensor& tokens, const at::Tensor& indices, int64_t rows, int64_t experts) {
  static auto handle = op("mm_kernels_cpu::moe_permute_fwd").typed<TensorPair(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return handle.call(tokens, indices, rows, experts);
}

at::Tensor unpermute(const at::Tensor& permuted, const at::Tensor& sorted, const std::optional<at::Tensor>& probs,
                     int64_t tokens) {
  static auto handle = op("mm_kernels_cpu::moe_unpermute_fwd")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t)>();
  return handle.call(permuted, sorted, probs, tokens);
}

TensorPair unpermute_bwd(const at::Tensor& dout, const at::Tensor& permuted, const at::Tensor& sorted,
                         const std::optional<at::Tensor>& probs) {
  static auto handle = op("mm_kernels_cpu::moe_unpermute_bwd")
                           .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const std::optional<at::Tensor>&)>();
  return handle.call(dout, permuted, sorted, probs);
}

at::Tensor sort_routing_map(const at::Tensor& map, int64_t capacity) {
  static auto handle = op("mm_kernels_cpu::moe_sort_routing_map").typed<at::Tensor(const at::Tensor&, int64_t)>();
  return handle.call(map, capacity);
}

at::Tensor combine(const at::Tensor& src, const at::Tensor& row_token, const std::optional<at::Tensor>& weight,
                   int64_t tokens) {
  static auto handle = op("mm_kernels_cpu::moe_combine")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t)>();
  return handle.call(src, row_token, weight, tokens);
}

std::vector<int64_t> as_vector(const at::Tensor& t) {
  const at::Tensor l = t.to(at::kLong).contiguous();
  return {l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + l.numel()};
}

// tokens [4, 2] = 0..7; experts per (token, slot): [[1, 0], [2, 1], [0, 2], [1, 1]].
at::Tensor golden_tokens() { return at::arange(8, at::kFloat).view({4, 2}); }
at::Tensor golden_indices(at::ScalarType dtype) {
  return at::tensor(std::vector<int64_t>{1, 0, 2, 1, 0, 2, 1, 1}).view({4, 2}).to(dtype);
}

template <typename Fn>
bool throws(Fn fn) {
  try {
    fn();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

}  // namespace

MMK_TEST(permute_sorts_slots_by_expert_then_slot) {
  for (auto dtype : {at::kInt, at::kLong}) {
    auto [permuted, sorted] = permute(golden_tokens(), golden_indices(dtype), 8, 3);
    MMK_CHECK(sorted.scalar_type() == at::kInt);
    MMK_CHECK((as_vector(sorted) == std::vector<int64_t>{2, 0, 6, 3, 1, 7, 4, 5}));
    // Rows hold tokens 0 2 | 0 1 3 3 | 1 2.
    MMK_CHECK((as_vector(permuted.select(1, 0)) == std::vector<int64_t>{0, 4, 0, 2, 6, 6, 2, 4}));
  }
}

MMK_TEST(unpermute_weights_sums_and_drops) {
  auto [permuted, sorted] = permute(golden_tokens(), golden_indices(at::kLong), 5, -1);
  const at::Tensor probs = at::tensor(std::vector<float>{0.5f, 0.25f, 1.f, 2.f, 3.f, 0.5f, 1.f, 1.5f}).view({4, 2});
  const at::Tensor out = unpermute(permuted, sorted, probs, 4);
  // Slots 2, 5, 7 map to rows 6, 7, 5 >= 5: dropped.
  const at::Tensor expected = at::tensor(std::vector<float>{0, 0.75f, 4, 6, 12, 15, 6, 7}).view({4, 2});
  MMK_CHECK(at::equal(out, expected));
}

MMK_TEST(unpermute_bwd_gives_token_and_prob_gradients) {
  auto [permuted, sorted] = permute(golden_tokens(), golden_indices(at::kLong), 8, 3);
  const at::Tensor probs = at::full({4, 2}, 0.5f);
  const at::Tensor dout = at::ones({4, 2});
  auto [dpermuted, dprobs] = unpermute_bwd(dout, permuted, sorted, probs);
  MMK_CHECK(at::equal(dpermuted, at::full({8, 2}, 0.5f)));
  // dprobs[t, k] = <tokens[t], dout[t]> = 2t + 2t + 1.
  const at::Tensor expected = at::tensor(std::vector<float>{1, 1, 5, 5, 9, 9, 13, 13}).view({4, 2});
  MMK_CHECK(at::equal(dprobs, expected));
}

MMK_TEST(bf16_sums_in_fp32) {
  // 256 copies of 1 + 2^-8 summed: fp32 keeps the small parts that a bf16 running sum would lose.
  const int64_t k = 256;
  const at::Tensor tokens = at::full({1, 16}, 1.0 + 1.0 / 256, at::kBFloat16);
  auto [permuted, sorted] = permute(tokens, at::zeros({1, k}, at::kLong), k, 1);
  const at::Tensor out = unpermute(permuted, sorted, std::nullopt, 1);
  MMK_CHECK(at::equal(out, at::full({1, 16}, 257.0, at::kBFloat16)));
}

MMK_TEST(empty_inputs_work) {
  auto [permuted, sorted] = permute(at::empty({0, 5}), at::empty({0, 3}, at::kLong), 0, -1);
  MMK_CHECK(permuted.size(0) == 0 && sorted.numel() == 0);
  MMK_CHECK(unpermute(permuted, sorted, std::nullopt, 0).sizes() == at::IntArrayRef({0, 5}));
}

MMK_TEST(bad_input_is_refused) {
  const at::Tensor tokens = golden_tokens();
  MMK_CHECK(throws([&] { permute(tokens, golden_indices(at::kLong), 8, 2); }));  // expert 2 >= 2
  MMK_CHECK(throws([&] { permute(tokens, golden_indices(at::kLong).neg(), 8, -1); }));
  MMK_CHECK(throws([&] { permute(tokens, golden_indices(at::kFloat), 8, 3); }));
  MMK_CHECK(throws([&] { permute(tokens, golden_indices(at::kLong).slice(0, 0, 3), 6, 3); }));
  MMK_CHECK(throws([&] { permute(tokens, golden_indices(at::kLong), 9, 3); }));  // more rows than slots
  auto [permuted, sorted] = permute(tokens, golden_indices(at::kLong), 8, 3);
  MMK_CHECK(throws([&] { unpermute(permuted, sorted, at::ones({4, 3}), 4); }));
  MMK_CHECK(throws([&] { unpermute(permuted, sorted.add(1), std::nullopt, 4); }));
  MMK_CHECK(throws([&] { unpermute_bwd(at::ones({4, 2}), permuted, at::zeros({8}, at::kInt), std::nullopt); }));
  MMK_CHECK(throws([&] { combine(permuted, at::full({8}, 4, at::kLong), std::nullopt, 4); }));
}

MMK_TEST(routing_map_rows_are_expert_major) {
  // tokens x experts: [[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]].
  const at::Tensor map = at::tensor(std::vector<int64_t>{1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0}).view({4, 3}).to(at::kBool);
  // row_slot = t * 3 + e: expert 0 <- tokens 0, 2; expert 1 <- 1, 2; expert 2 <- 0, 1.
  MMK_CHECK((as_vector(sort_routing_map(map, -1)) == std::vector<int64_t>{0, 6, 4, 7, 2, 5}));
  // Capacity 3: each expert padded with its first unrouted token.
  MMK_CHECK((as_vector(sort_routing_map(map, 3)) == std::vector<int64_t>{0, 6, 3, 4, 7, 1, 2, 5, 8}));
  const at::Tensor rows = at::tensor(std::vector<int64_t>{0, 2, 1, 2, 0, 1});
  const at::Tensor out = combine(at::ones({6, 2}), rows, at::full({6}, 0.5f), 4);
  MMK_CHECK(at::equal(out, at::tensor(std::vector<float>{1, 1, 1, 1, 1, 1, 0, 0}).view({4, 2})));
}

MMK_TEST_MAIN()
