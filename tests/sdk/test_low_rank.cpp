// tessera::low_rank: y = s · (x Aᵀ) Bᵀ and its three gradients against float64 autograd of
// the formula, with and without x's gradient, in bf16 with float32 masters, and outside
// autograd.
#include "support.h"

#include <tessera/low_rank.h>

#include <torch/csrc/autograd/autograd.h>

using namespace tessera;
using tessera::test::max_abs_diff;

namespace {

struct Grads {
  Tensor y, x, A, B;
};

// y and the gradients of Σ y ∘ g, in float64 through autograd's own products.
Grads reference(const Tensor& x, const Tensor& A, const Tensor& B, double s, const Tensor& g) {
  Tensor x64 = x.detach().to(at::kDouble).requires_grad_(true), A64 = A.detach().to(at::kDouble).requires_grad_(true),
         B64 = B.detach().to(at::kDouble).requires_grad_(true);
  Tensor y = at::matmul(at::matmul(x64, A64.t()), B64.t()) * s;
  torch::autograd::backward({y}, {g.to(at::kDouble)});
  return {y.detach(), x64.grad(), A64.grad(), B64.grad()};
}

double scale(const Tensor& t) { return t.abs().max().item<double>(); }

// How far float32 may land from each of them (tests/support.h): a product of three factors
// with inner lengths m and n, in either order, stays within γ_{m+n} of the product of their
// magnitudes; the scale s is one more rounding.
Grads bounds(const Tensor& x, const Tensor& A, const Tensor& B, double s, const Tensor& g) {
  const Tensor ax = x.detach().abs().to(at::kDouble).reshape({-1, x.size(-1)}), aA = A.detach().abs().to(at::kDouble),
               aB = B.detach().abs().to(at::kDouble), ag = g.abs().to(at::kDouble).reshape({-1, g.size(-1)});
  const std::int64_t rows = ax.size(0), in = A.size(1), r = A.size(0), out = B.size(0);
  const Tensor y = test::gamma(in + r + 1) * s * at::matmul(at::matmul(ax, aA.t()), aB.t());      // (N, out)
  const Tensor dx = test::gamma(out + r + 1) * s * at::matmul(at::matmul(ag, aB), aA);             // (N, in)
  const Tensor dA = test::gamma(out + rows + 1) * s * at::matmul(at::matmul(ag, aB).t(), ax);      // (r, in)
  const Tensor dB = test::gamma(in + rows + 1) * s * at::matmul(ag.t(), at::matmul(ax, aA.t()));   // (out, r)
  return {y.reshape(g.sizes()), dx.reshape(x.sizes()), dA, dB};
}

}  // namespace

CATCH_TEST_CASE("low_rank: value and the gradients of x, A and B equal autograd's of s (x Aᵀ) Bᵀ", "[sdk][low_rank]") {
  at::manual_seed(3);
  const auto f32 = test::options();
  const std::int64_t in = 48, out = 80, r = 4;
  const double s = 2.5;
  for (bool x_grad : {true, false}) {
    CATCH_INFO("x needs its gradient: " << x_grad);
    Tensor x = at::randn({3, 7, in}, f32).requires_grad_(x_grad);  // (B, T, in): the rows of a batch
    Tensor A = (at::randn({r, in}, f32) * 0.2).requires_grad_(true), B = (at::randn({out, r}, f32) * 0.2).requires_grad_(true);
    Tensor g = at::randn({3, 7, out}, f32);
    Tensor y = low_rank(x, A, B, s);
    torch::autograd::backward({y}, {g});
    const Grads ref = reference(x, A, B, s, g), bound = bounds(x, A, B, s, g);
    CATCH_CHECK(y.sizes() == ref.y.sizes());
    CATCH_CHECK(test::bound_ratio(y, ref.y, bound.y) <= 1);
    CATCH_CHECK(test::bound_ratio(A.grad(), ref.A, bound.A) <= 1);
    CATCH_CHECK(test::bound_ratio(B.grad(), ref.B, bound.B) <= 1);
    if (x_grad) CATCH_CHECK(test::bound_ratio(x.grad(), ref.x, bound.x) <= 1);
    else CATCH_CHECK_FALSE(x.grad().defined());
    // Outside autograd: the same values, no graph.
    at::NoGradGuard no_grad;
    Tensor plain = low_rank(x, A, B, s);
    CATCH_CHECK_FALSE(plain.requires_grad());
    CATCH_CHECK(test::bound_ratio(plain, ref.y, bound.y) <= 1);
  }
}

CATCH_TEST_CASE("low_rank: a bf16 x with float32 masters computes in bf16, and the masters' gradients arrive in float32", "[sdk][low_rank]") {
  at::manual_seed(4);
  const auto f32 = test::options();
  Tensor x = at::randn({16, 32}, f32).to(at::kBFloat16).requires_grad_(true);
  Tensor A = (at::randn({8, 32}, f32) * 0.2).requires_grad_(true), B = (at::randn({24, 8}, f32) * 0.2).requires_grad_(true);
  Tensor g = at::randn({16, 24}, f32).to(at::kBFloat16);
  Tensor y = low_rank(x, A, B, 2.0);
  CATCH_CHECK(y.scalar_type() == at::kBFloat16);
  torch::autograd::backward({y}, {g});
  CATCH_CHECK(A.grad().scalar_type() == at::kFloat);
  CATCH_CHECK(B.grad().scalar_type() == at::kFloat);
  CATCH_CHECK(x.grad().scalar_type() == at::kBFloat16);
  const Grads ref = reference(x, A, B, 2.0, g);
  // bf16 keeps 8 bits of mantissa: a few parts in a hundred of each tensor's scale.
  CATCH_CHECK(max_abs_diff(y, ref.y) < 3e-2 * scale(ref.y));
  CATCH_CHECK(max_abs_diff(A.grad(), ref.A) < 3e-2 * scale(ref.A));
  CATCH_CHECK(max_abs_diff(B.grad(), ref.B) < 3e-2 * scale(ref.B));
  CATCH_CHECK(max_abs_diff(x.grad(), ref.x) < 3e-2 * scale(ref.x));
}

CATCH_TEST_CASE("low_rank: shapes that do not chain are refused with the three shapes", "[sdk][low_rank]") {
  const auto f32 = test::options();
  CATCH_CHECK_THROWS_WITH(low_rank(at::zeros({2, 5}, f32), at::zeros({4, 6}, f32), at::zeros({3, 4}, f32), 1.0),
                          Catch::Contains("low_rank: x [2, 5], A [4, 6], B [3, 4] do not chain as x Aᵀ Bᵀ"));
}
