// tessera::dropout against inverted dropout's definition (Srivastava et al. 2014, scaled as
// torch scales it): every element is 0 or x/(1 − p), kept with probability 1 − p
// independently (checked statistically, per block of draws too), the gradient is the mask
// over 1 − p, and the mask follows the seed alone, whatever the thread count. On the CPU p
// is used rounded to a multiple of 2^-15 (dropout.h); on a GPU (the test device may be
// one) it is torch's fused kernel with p as given.
#include "support.h"

#include <tessera/dropout.h>

#include <ATen/Parallel.h>

#include <cmath>

using namespace tessera;

namespace {

// Within `sigmas` standard deviations of the mean of n Bernoulli(q) draws.
void check_fraction(double observed, double q, std::int64_t n, double sigmas = 5.0) {
  CATCH_CHECK(std::abs(observed - q) < sigmas * std::sqrt(q * (1 - q) / static_cast<double>(n)));
}

}  // namespace

CATCH_TEST_CASE("dropout outside training or at p = 0 is the input itself, and p outside [0, 1] is refused", "[sdk][dropout]") {
  Tensor x = at::randn({4, 5}, test::options());
  CATCH_CHECK(tessera::dropout(x, 0.3, false).is_same(x));
  CATCH_CHECK(tessera::dropout(x, 0.0, true).is_same(x));
  CATCH_CHECK_THROWS_WITH(tessera::dropout(x, -0.1, true), Catch::Contains("must lie in [0, 1]"));
  CATCH_CHECK_THROWS_WITH(tessera::dropout(x, 1.5, true), Catch::Contains("must lie in [0, 1]"));
  Tensor all = tessera::dropout(x.requires_grad_(), 1.0, true);  // nothing kept, gradient zero
  all.sum().backward();
  CATCH_CHECK(all.abs().max().item<double>() == 0.0);
  CATCH_CHECK(x.grad().abs().max().item<double>() == 0.0);
}

CATCH_TEST_CASE("dropout keeps each element with probability 1 - p, scaled by 1/(1 - p), independently", "[sdk][dropout]") {
  const double p = 0.3;
  const std::int64_t n = 1000003;  // not a whole number of blocks
  at::manual_seed(11);
  Tensor y = tessera::dropout(at::ones({n}, test::options()), p, true).to(at::kCPU);  // (n)
  Tensor kept = y != 0;
  // Every value is 0 or exactly 1/(1 − p) in float32, p rounded on the CPU.
  const double used = test::device().is_cpu() ? std::round(p * 32768) / 32768 : p;
  const float scale = static_cast<float>(1.0 / (1.0 - used));
  CATCH_CHECK((kept.logical_not() | (y == scale)).all().item<bool>());
  check_fraction(kept.to(at::kDouble).mean().item<double>(), 1 - p, n);
  // E[y] = x: inverted dropout is unbiased.
  CATCH_CHECK(std::abs(y.to(at::kDouble).mean().item<double>() - 1.0) < 5 * std::sqrt(p / (1 - p) / n));
  // Each block of 2^16 draws keeps its share; two blocks agree only as independent masks
  // would (p² + (1 − p)²), not as copies; neighbours are independent.
  const std::int64_t block = 1 << 16;
  for (std::int64_t b = 0; b * block < n; ++b) {
    const std::int64_t len = std::min(block, n - b * block);
    check_fraction(kept.narrow(0, b * block, len).to(at::kDouble).mean().item<double>(), 1 - p, len);
  }
  check_fraction((kept.narrow(0, 0, block) == kept.narrow(0, block, block)).to(at::kDouble).mean().item<double>(), p * p + (1 - p) * (1 - p), block);
  check_fraction((kept.narrow(0, 0, n - 1) & kept.narrow(0, 1, n - 1)).to(at::kDouble).mean().item<double>(), (1 - p) * (1 - p), n - 1);
}

CATCH_TEST_CASE("dropout's gradient is the mask over 1 - p, and a non-contiguous input keeps its shape", "[sdk][dropout]") {
  const double p = 0.2;
  Tensor x = (at::rand({300, 70}, test::options()) + 0.5).t().requires_grad_();  // (70, 300), no zeros, transposed
  Tensor g = at::randn({70, 300}, test::options());
  Tensor y = tessera::dropout(x, p, true);
  CATCH_REQUIRE(y.sizes() == x.sizes());
  y.backward(g);
  const Tensor keep = (y != 0).to(at::kDouble);
  const double used = test::device().is_cpu() ? std::round(p * 32768) / 32768 : p;  // 0.2 is 6553.6 / 2^15
  CATCH_CHECK(test::max_abs_diff(y, x.detach().to(at::kDouble) * keep / (1 - used)) < 1e-6);
  CATCH_CHECK(test::max_abs_diff(x.grad(), g.to(at::kDouble) * keep / (1 - used)) < 1e-6);
}

CATCH_TEST_CASE("dropout's mask follows the seed, whatever the thread count", "[sdk][dropout]") {
  if (!test::device().is_cpu()) return;  // the block layout is the CPU path's
  Tensor x = at::ones({200000}, test::options());
  at::manual_seed(5);
  Tensor a = tessera::dropout(x, 0.5, true);
  Tensor b = tessera::dropout(x, 0.5, true);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  at::manual_seed(5);
  Tensor c = tessera::dropout(x, 0.5, true);
  at::set_num_threads(threads);
  CATCH_CHECK(at::equal(a, c));   // same seed, one thread instead of several
  CATCH_CHECK(!at::equal(a, b));  // the next call draws anew
  // A p below half a step of 2^-15 rounds to nothing dropped.
  CATCH_CHECK(at::equal(tessera::dropout(x, 1e-5, true), x));
}
