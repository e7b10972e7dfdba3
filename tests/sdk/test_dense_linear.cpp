// tessera::dense_linear: the product x Wᵀ + b against float64, on every weight layout the models
// hand it (plain, a Conv1D weight transposed in place, a row block of one), and which kernel
// serves it: oneDNN only where no gradient can be asked for, at::linear everywhere else.
#include "support.h"

#include <tessera/dense_linear.h>

#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <optional>
#include <set>

using namespace tessera;
using tessera::test::max_abs_diff;

namespace {

// The names of the operators one call dispatches, outermost first.
std::set<std::string> ops_of(const std::function<void()>& call) {
  static thread_local std::set<std::string>* seen = nullptr;
  std::set<std::string> names;
  seen = &names;
  const auto handle = at::addThreadLocalCallback(at::RecordFunctionCallback([](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
    if (seen) seen->insert(fn.name());
    return nullptr;
  }));
  call();
  at::removeCallback(handle);
  seen = nullptr;
  return names;
}

Tensor reference(const Tensor& x, const Tensor& w, const Tensor& b) {  // float64 x Wᵀ + b
  Tensor y = at::matmul(x.to(at::kDouble), w.to(at::kDouble).t());
  return b.defined() ? y + b.to(at::kDouble) : y;
}

// How far float32 x Wᵀ + b may land from it, element by element: γ_{K+1} (|x| |W|ᵀ + |b|)
// (tests/support.h; the bias add is one more rounding).
Tensor bound(const Tensor& x, const Tensor& w, const Tensor& b) { return test::gamma(w.size(1) + 1) * reference(x.abs(), w.abs(), b.defined() ? b.abs() : b); }

// The activations by their papers' formulas, in float64.
Tensor formula(Activation act, const Tensor& z) {
  switch (act) {
    case Activation::relu: return z.clamp_min(0);
    case Activation::gelu: return 0.5 * z * (1 + at::erf(z / std::sqrt(2.0)));  // z Φ(z), Hendrycks & Gimpel
    case Activation::gelu_tanh: return 0.5 * z * (1 + at::tanh(std::sqrt(2.0 / M_PI) * (z + 0.044715 * z.pow(3))));
    case Activation::silu: return z / (1 + at::exp(-z));  // z σ(z), Elfwing et al.
    case Activation::none: break;
  }
  return z;
}

}  // namespace

CATCH_TEST_CASE("linear: x Wᵀ + b equals float64 on plain, transposed and row-block weights, with and without bias", "[sdk][linear]") {
  at::manual_seed(3);
  const auto o = test::options();
  const Tensor x = at::randn({4, 9, 48}, o), conv1d = at::randn({48, 96}, o) * 0.2, plain = at::randn({32, 48}, o) * 0.2;
  const Tensor b96 = at::randn({96}, o), b32 = at::randn({32}, o);
  struct Case { const char* name; Tensor x, w, b; };
  const std::vector<Case> cases = {
      {"plain", x, plain, b32},
      {"no bias", x, plain, Tensor()},
      {"Conv1D weight, transposed in place", x, conv1d.t(), b96},
      {"row block of a transposed weight", x, conv1d.t().narrow(0, 32, 32), b96.narrow(0, 32, 32)},
      {"non-contiguous input", x.transpose(0, 1), plain, b32},
      {"2-d input", x.reshape({-1, 48}), plain, b32},
  };
  for (const bool inference : {false, true}) {
    std::optional<c10::InferenceMode> mode;
    std::optional<at::NoGradGuard> no_grad;
    if (inference) mode.emplace(); else no_grad.emplace();
    for (const auto& c : cases) {
      CATCH_INFO(c.name << (inference ? " (inference mode)" : " (no grad)"));
      const Tensor y = dense_linear(c.x, c.w, c.b);
      CATCH_CHECK(y.sizes().slice(0, y.dim() - 1) == c.x.sizes().slice(0, c.x.dim() - 1));
      CATCH_CHECK(y.size(-1) == c.w.size(0));
      CATCH_CHECK(test::bound_ratio(y, reference(c.x, c.w, c.b), bound(c.x, c.w, c.b)) <= 1);
    }
  }
}

CATCH_TEST_CASE("linear: oneDNN serves CPU float32 products with a frozen weight, and a weight that trains stays at::linear", "[sdk][linear]") {
  at::manual_seed(4);
  const Tensor x = at::randn({3, 5, 16}), w = at::randn({8, 16}), b = at::randn({8});
  {
    at::NoGradGuard no_grad;
    const auto ops = ops_of([&] { dense_linear(x, w, b); });
    CATCH_CHECK(ops.count("mkldnn::_linear_pointwise") == at::hasMKLDNN());
    // float64 and empty inputs take at::linear
    CATCH_CHECK(ops_of([&] { dense_linear(x.to(at::kDouble), w.to(at::kDouble)); }).count("mkldnn::_linear_pointwise") == 0);
    CATCH_CHECK(dense_linear(x.narrow(0, 0, 0), w, b).sizes() == at::IntArrayRef({0, 5, 8}));
  }
  // The input asks for a gradient, the weight is frozen: oneDNN forward and backward.
  const Tensor xg = x.clone().requires_grad_(), wg = w.clone().requires_grad_(), g = at::randn({3, 5, 8});
  Tensor y;
  auto ops = ops_of([&] { y = dense_linear(xg, w, b); });
  CATCH_CHECK(ops.count("mkldnn::_linear_pointwise") == at::hasMKLDNN());
  CATCH_CHECK(test::bound_ratio(y, reference(x, w, b), bound(x, w, b)) <= 1);
  ops = ops_of([&] { y.backward(g); });
  CATCH_CHECK(ops.count("mkldnn::_linear_pointwise") == at::hasMKLDNN());
  const Tensor dx = at::matmul(g.to(at::kDouble), w.to(at::kDouble)), dx_bound = test::gamma(8) * at::matmul(g.abs().to(at::kDouble), w.abs().to(at::kDouble));
  CATCH_CHECK(test::bound_ratio(xg.grad(), dx, dx_bound) <= 1);  // ∂x = g W
  // A weight that trains: at::linear records both gradients.
  xg.mutable_grad().reset();
  CATCH_CHECK(ops_of([&] { y = dense_linear(xg, wg, b); }).count("mkldnn::_linear_pointwise") == 0);
  y.backward(g);
  CATCH_CHECK(test::bound_ratio(xg.grad(), dx, dx_bound) <= 1);
  const Tensor g2 = g.reshape({-1, 8}).t().to(at::kDouble), x2 = x.reshape({-1, 16}).to(at::kDouble);  // (8, 15), (15, 16)
  CATCH_CHECK(test::bound_ratio(wg.grad(), at::matmul(g2, x2), test::gamma(15) * at::matmul(g2.abs(), x2.abs())) <= 1);  // ∂W = gᵀ x
  // Gradients on but nothing asks for one: oneDNN again.
  CATCH_CHECK(ops_of([&] { dense_linear(x, w, b); }).count("mkldnn::_linear_pointwise") == at::hasMKLDNN());
}

CATCH_TEST_CASE("dense_linear: activations and the product with times equal their formulas, fused or not", "[sdk][linear]") {
  at::manual_seed(5);
  const auto o = test::options();
  const Tensor x = at::randn({2, 7, 24}, o), w = at::randn({40, 24}, o) * 0.4, b = at::randn({40}, o);
  const Tensor times = at::randn({2, 7, 40}, o), per_unit = at::randn({40}, o);  // same shape / broadcast
  for (const auto act : {Activation::none, Activation::relu, Activation::gelu, Activation::gelu_tanh, Activation::silu})
    for (const bool grad : {false, true}) {
      CATCH_INFO("activation " << static_cast<int>(act) << (grad ? ", input asks for a gradient" : ", no grad"));
      std::optional<at::NoGradGuard> no_grad;
      if (!grad) no_grad.emplace();
      const Tensor xi = grad ? x.clone().requires_grad_() : x;
      const Tensor z = reference(x, w, b), z0 = reference(x, w, Tensor());  // (2, 7, 40) float64
      // The product's bound carried through the activation (every one here has a slope of at
      // most 1.13) plus a few roundings of its own evaluation, then one more for each factor.
      const auto act_bound = [&](const Tensor& zz, const Tensor& bz, const Tensor& factor) {
        const Tensor f = formula(act, zz).abs(), t = factor.to(at::kDouble).abs();
        return (1.13 * bz + 8 * test::kEpsF32 * f) * t + test::kEpsF32 * f * t;
      };
      const Tensor one = at::ones({1}, o.dtype(at::kDouble));
      CATCH_CHECK(test::bound_ratio(dense_linear(xi, w, b, act), formula(act, z), act_bound(z, bound(x, w, b), one)) <= 1);
      CATCH_CHECK(test::bound_ratio(dense_linear(xi, w, b, act, times), formula(act, z) * times.to(at::kDouble), act_bound(z, bound(x, w, b), times)) <= 1);
      CATCH_CHECK(test::bound_ratio(dense_linear(xi, w, Tensor(), act, per_unit), formula(act, z0) * per_unit.to(at::kDouble),
                                    act_bound(z0, bound(x, w, Tensor()), per_unit)) <= 1);
      if (grad) {  // ∂/∂x of Σ act(x Wᵀ + b) ∘ times, against autograd through the float64 formula
        const Tensor x64 = x.to(at::kDouble).requires_grad_();
        (formula(act, at::matmul(x64, w.to(at::kDouble).t()) + b.to(at::kDouble)) * times.to(at::kDouble)).sum().backward();
        dense_linear(xi, w, b, act, times).sum().backward();
        // A fixed tolerance here: the slope's own rounding has no simple bound at relu's kink.
        // Unit-scale values: 1e-4 is some 800 float32 steps of them.
        CATCH_CHECK(max_abs_diff(xi.grad(), x64.grad()) < 1e-4);
      }
    }
}

CATCH_TEST_CASE("dense_linear: without gradients the activation and the product run inside the oneDNN kernel", "[sdk][linear]") {
  CATCH_REQUIRE(at::hasMKLDNN());  // the pinned torch wheel is built with it
  at::NoGradGuard no_grad;
  const Tensor x = at::randn({3, 5, 16}), w = at::randn({8, 16}), times = at::randn({3, 5, 8});
  auto ops = ops_of([&] { dense_linear(x, w, Tensor(), Activation::gelu); });
  CATCH_CHECK(ops.count("mkldnn::_linear_pointwise") == 1);
  CATCH_CHECK(ops.count("aten::gelu") == 0);
  ops = ops_of([&] { dense_linear(x, w, Tensor(), Activation::none, times); });
  CATCH_CHECK(ops.count("mkldnn::_linear_pointwise") == 1);
  CATCH_CHECK(ops.count("aten::mul") == 0);
}
