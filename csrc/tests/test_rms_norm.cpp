// C++ tests of the RMSNorm CPU kernels against an fp64 ATen oracle, plus determinism,
// edge shapes and input checks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <tuple>

#include "check.h"
#include "rms_norm.h"

namespace {

constexpr double kEps = 1e-6;

// Values of x.dtype compared with an fp64 oracle: a few roundings of that dtype.
double tolerance(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return 2e-2;
  if (dtype == at::kHalf) return 4e-3;
  return 1e-5;
}

bool close(const at::Tensor& actual, const at::Tensor& expected, double tol) {
  return at::allclose(actual.to(at::kDouble), expected.to(at::kDouble), tol, tol);
}

at::Tensor oracle_rstd(const at::Tensor& x) {
  return at::rsqrt(x.to(at::kDouble).pow(2).mean(-1) + kEps);
}

at::Tensor oracle_forward(const at::Tensor& x, const at::Tensor& weight, double offset) {
  const at::Tensor xd = x.to(at::kDouble);
  return xd * oracle_rstd(x).unsqueeze(-1) * (weight.to(at::kDouble) + offset);
}

// (dx, dweight) in fp64: dx = r * (g - n * mean(g * n)), dweight = sum over rows of dy * n.
std::tuple<at::Tensor, at::Tensor> oracle_backward(const at::Tensor& dy, const at::Tensor& x,
                                                   const at::Tensor& weight, double offset) {
  const at::Tensor r = oracle_rstd(x).unsqueeze(-1);
  const at::Tensor n = x.to(at::kDouble) * r;
  const at::Tensor g = dy.to(at::kDouble) * (weight.to(at::kDouble) + offset);
  const at::Tensor dx = r * (g - n * (g * n).mean(-1, true));
  const at::Tensor dweight = (dy.to(at::kDouble) * n).reshape({-1, x.size(-1)}).sum(0);
  return {dx, dweight};
}

using mmk::testing::throws;

MMK_TEST(forward_matches_fp64_oracle) {
  at::manual_seed(0);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t hidden : {1, 123, 4096}) {
      for (const char* casting : {"llama", "gemma", "none"}) {
        const at::Tensor x = at::randn({37, hidden}).to(dtype);
        const at::Tensor weight = at::randn({hidden}).to(dtype);
        const auto [y, rstd] = mmk::rms_norm_fwd(x, weight, kEps, casting, 0.5);
        MMK_CHECK(y.scalar_type() == dtype && rstd.scalar_type() == at::kFloat);
        MMK_CHECK(close(rstd, oracle_rstd(x), 1e-5));
        MMK_CHECK(close(y, oracle_forward(x, weight, 0.5), tolerance(dtype)));
      }
    }
  }
}

MMK_TEST(forward_without_weight_and_with_fp32_weight) {
  const at::Tensor x = at::randn({5, 3, 64}).to(at::kBFloat16);
  const auto [y, rstd] = mmk::rms_norm_fwd(x, std::nullopt, kEps, "llama", 0.0);
  MMK_CHECK(rstd.sizes() == at::IntArrayRef({5, 3}));
  MMK_CHECK(close(y, oracle_forward(x, at::ones({64}), 0.0), tolerance(at::kBFloat16)));
  const at::Tensor weight = at::randn({64});
  const auto [y32, rstd32] = mmk::rms_norm_fwd(x, weight, kEps, "gemma", 1.0);
  MMK_CHECK(y32.scalar_type() == at::kBFloat16);
  MMK_CHECK(close(y32, oracle_forward(x, weight, 1.0), tolerance(at::kBFloat16)));
}

MMK_TEST(backward_matches_fp64_oracle) {
  at::manual_seed(1);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t hidden : {1, 123, 1024}) {
      const at::Tensor x = at::randn({50, hidden}).to(dtype);
      const at::Tensor dy = at::randn({50, hidden}).to(dtype);
      const at::Tensor weight = at::randn({hidden}).to(dtype);
      const auto [y, rstd] = mmk::rms_norm_fwd(x, weight, kEps, "gemma", 0.25);
      const auto [dx, dweight] = mmk::rms_norm_bwd(dy, x, weight, rstd, kEps, "gemma", 0.25);
      const auto [dx_ref, dweight_ref] = oracle_backward(dy, x, weight, 0.25);
      MMK_CHECK(dx.scalar_type() == dtype && dweight.scalar_type() == dtype);
      MMK_CHECK(close(dx, dx_ref, tolerance(dtype)));
      MMK_CHECK(close(dweight, dweight_ref, tolerance(dtype) * 8));  // ~sqrt(50) rows summed
    }
  }
}

MMK_TEST(weight_gradient_bits_do_not_depend_on_thread_count) {
  const at::Tensor x = at::randn({1000, 96}).to(at::kBFloat16);
  const at::Tensor dy = at::randn({1000, 96}).to(at::kBFloat16);
  const at::Tensor weight = at::randn({96});
  const auto [y, rstd] = mmk::rms_norm_fwd(x, weight, kEps, "llama", 0.0);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const auto [dx1, dw1] = mmk::rms_norm_bwd(dy, x, weight, rstd, kEps, "llama", 0.0);
  at::set_num_threads(2);
  const auto [dx2, dw2] = mmk::rms_norm_bwd(dy, x, weight, rstd, kEps, "llama", 0.0);
  at::set_num_threads(threads);
  MMK_CHECK(at::equal(dw1, dw2));
  MMK_CHECK(at::equal(dx1, dx2));
}

MMK_TEST(empty_rows_and_non_contiguous_input) {
  const at::Tensor empty = at::randn({0, 16});
  const at::Tensor weight = at::randn({16});
  const auto [y, rstd] = mmk::rms_norm_fwd(empty, weight, kEps, "llama", 0.0);
  MMK_CHECK(y.sizes() == empty.sizes() && rstd.numel() == 0);
  const auto [dx, dweight] = mmk::rms_norm_bwd(empty, empty, weight, rstd, kEps, "llama", 0.0);
  MMK_CHECK(dx.numel() == 0 && dweight.sizes() == weight.sizes() && dweight.eq(0).all().item<bool>());

  const at::Tensor strided = at::randn({16, 40}).t();  // [40, 16], column-major
  MMK_CHECK(!strided.is_contiguous());
  const auto [ys, rs] = mmk::rms_norm_fwd(strided, weight, kEps, "llama", 0.0);
  const auto [yc, rc] = mmk::rms_norm_fwd(strided.contiguous(), weight, kEps, "llama", 0.0);
  MMK_CHECK(at::equal(ys, yc) && at::equal(rs, rc));
}

MMK_TEST(add_rms_norm_normalises_the_sum) {
  const at::Tensor x = at::randn({7, 300}).to(at::kHalf);
  const at::Tensor residual = at::randn({7, 300}).to(at::kHalf);
  const at::Tensor weight = at::randn({300}).to(at::kHalf);
  const auto [y, rstd, summed] = mmk::add_rms_norm_fwd(x, residual, weight, kEps);
  MMK_CHECK(at::equal(summed, x + residual));
  const auto [y_ref, rstd_ref] = mmk::rms_norm_fwd(x + residual, weight, kEps, "llama", 0.0);
  MMK_CHECK(at::equal(y, y_ref) && at::equal(rstd, rstd_ref));
}

MMK_TEST(bad_input_is_rejected) {
  const at::Tensor x = at::randn({4, 8});
  MMK_CHECK(throws([&] { mmk::rms_norm_fwd(x, at::randn({9}), kEps, "llama", 0.0); }));
  MMK_CHECK(throws([&] { mmk::rms_norm_fwd(x.to(at::kInt), std::nullopt, kEps, "llama", 0.0); }));
  MMK_CHECK(throws([&] { mmk::rms_norm_fwd(x.to(at::kDouble), std::nullopt, kEps, "llama", 0.0); }));
  MMK_CHECK(throws([&] { mmk::rms_norm_fwd(at::randn({4, 0}), std::nullopt, kEps, "llama", 0.0); }));
  MMK_CHECK(throws([&] { mmk::rms_norm_fwd(x, std::nullopt, kEps, "mistral", 0.0); }));
  MMK_CHECK(throws([&] { mmk::rms_norm_fwd(x, std::nullopt, -1.0, "llama", 0.0); }));
  const at::Tensor rstd = at::ones({4});
  MMK_CHECK(throws([&] { mmk::rms_norm_bwd(at::randn({4, 9}), x, std::nullopt, rstd, kEps, "llama", 0.0); }));
  MMK_CHECK(throws([&] { mmk::rms_norm_bwd(x, x, std::nullopt, at::ones({3}), kEps, "llama", 0.0); }));
  MMK_CHECK(throws([&] { mmk::add_rms_norm_fwd(x, x.to(at::kHalf), std::nullopt, kEps); }));
}

}  // namespace

MMK_TEST_MAIN()
