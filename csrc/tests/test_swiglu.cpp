// C++ tests of the SwiGLU operators (mm_kernels_cpu::swiglu_*) against ATen's silu in fp64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "tests/check.h"

namespace {

at::Tensor swiglu_fwd(const at::Tensor& x, int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mm_kernels_cpu::swiglu_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(x, dim);
}

at::Tensor swiglu_bwd(const at::Tensor& dy, const at::Tensor& x, int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mm_kernels_cpu::swiglu_bwd", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(dy, x, dim);
}

std::tuple<at::Tensor, at::Tensor> swiglu_pair_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mm_kernels_cpu::swiglu_pair_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&)>();
  return op.call(dy, gate, up);
}

at::Tensor expected_fwd(const at::Tensor& x, int64_t dim) {
  auto halves = x.to(at::kDouble).chunk(2, dim);
  return at::silu(halves[0]) * halves[1];
}

// (dgate, dup) in fp64 from the derivative of silu.
std::pair<at::Tensor, at::Tensor> expected_pair_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                                    const at::Tensor& up) {
  const at::Tensor a = gate.to(at::kDouble), b = up.to(at::kDouble), g = dy.to(at::kDouble);
  const at::Tensor s = at::sigmoid(a);
  return {g * b * s * (1 + a * (1 - s)), g * a * s};
}

bool close(const at::Tensor& actual, const at::Tensor& expected, double tol) {
  return actual.sizes() == expected.sizes() && at::allclose(actual.to(at::kDouble), expected, tol, tol);
}

using mmk::testing::throws;

}  // namespace

MMK_TEST(forward_matches_fp64_for_each_dtype) {
  const std::pair<at::ScalarType, double> cases[] = {{at::kFloat, 1e-5}, {at::kHalf, 1e-3}, {at::kBFloat16, 2e-2}};
  for (const auto& [dtype, tol] : cases) {
    const at::Tensor x = (3 * at::randn({37, 2 * 123})).to(dtype);
    const at::Tensor y = swiglu_fwd(x, -1);
    MMK_CHECK(y.scalar_type() == dtype);
    MMK_CHECK(close(y, expected_fwd(x, -1), tol));
  }
}

MMK_TEST(forward_splits_any_dim_of_non_contiguous_input) {
  const at::Tensor x = at::randn({5, 6, 9}).transpose(0, 2);  // [9, 6, 5]
  for (int64_t dim : {1, -2}) {
    MMK_CHECK(close(swiglu_fwd(x, dim), expected_fwd(x, dim), 1e-5));
  }
}

MMK_TEST(backward_matches_fp64) {
  const at::Tensor x = 3 * at::randn({4, 3, 10});
  const at::Tensor dy = at::randn({4, 3, 5});
  const auto halves = x.chunk(2, -1);
  const auto [dgate, dup] = expected_pair_bwd(dy, halves[0], halves[1]);
  MMK_CHECK(close(swiglu_bwd(dy, x, 2), at::cat({dgate, dup}, 2), 1e-5));
  const auto [dgate_pair, dup_pair] = swiglu_pair_bwd(dy, halves[0], halves[1]);
  MMK_CHECK(close(dgate_pair, dgate, 1e-5));
  MMK_CHECK(close(dup_pair, dup, 1e-5));
}

MMK_TEST(large_input_spans_several_tiles_and_threads) {
  const at::Tensor x = at::randn({3, 2 * 40000}).to(at::kBFloat16);
  MMK_CHECK(close(swiglu_fwd(x, 1), expected_fwd(x, 1), 2e-2));
}

MMK_TEST(empty_input_gives_empty_output) {
  MMK_CHECK(swiglu_fwd(at::randn({0, 8}), -1).sizes() == at::IntArrayRef({0, 4}));
  MMK_CHECK(swiglu_bwd(at::randn({3, 0}), at::randn({3, 0}), 1).sizes() == at::IntArrayRef({3, 0}));
}

MMK_TEST(bad_input_is_rejected) {
  MMK_CHECK(throws([] { swiglu_fwd(at::randn({3, 5}), -1); }));
  MMK_CHECK(throws([] { swiglu_fwd(at::randn({3, 4}, at::kDouble), -1); }));
  MMK_CHECK(throws([] { swiglu_fwd(at::ones({3, 4}, at::kInt), -1); }));
  MMK_CHECK(throws([] { swiglu_fwd(at::randn({3, 4}), 2); }));
  MMK_CHECK(throws([] { swiglu_bwd(at::randn({3, 3}), at::randn({3, 4}), -1); }));
  MMK_CHECK(throws([] { swiglu_pair_bwd(at::randn({2, 3}), at::randn({2, 3}), at::randn({3, 2})); }));
}

MMK_TEST_MAIN()
