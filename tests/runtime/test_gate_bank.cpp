// The gate bank (host/runtime/gate_bank.h): the gates of one input are the columns of one
// product, each sample's mean of σ(x W_gᵀ + b) — checked against that formula per gate — read
// back for the same x, and computed again when x or a gate's tensors change in place (an
// optimizer step between two passes over one tensor must not meet the old gates).
#include "support.h"

#include "runtime/gate_bank.h"

#include <tessera/internal/sites_impl.h>

using namespace tessera;

CATCH_TEST_CASE("gate bank: one input's gates are one product's columns, each sample's mean of σ(x W_gᵀ + b), computed again after an in-place change", "[runtime][composition]") {
  at::manual_seed(21);
  ModelViewImpl view;  // no forward context: every position of a (B, T, F) input counts
  GateBank bank(view);
  Tensor w1 = at::randn({1, 4}), b1 = at::randn({1}), w2 = at::randn({1, 4}), b2 = at::randn({1});
  const auto c1 = bank.add("layers.0.attn.q", w1, b1), c2 = bank.add("layers.0.attn.q", w2, b2);
  CATCH_CHECK(c1 == 0);
  CATCH_CHECK(c2 == 1);
  Tensor x = at::randn({2, 3, 4});
  auto expect = [&](const Tensor& w, const Tensor& b) { return at::sigmoid(at::linear(x, w, b)).mean(1, true); };  // (B, 1, 1)
  const Tensor g1 = bank.gate("layers.0.attn.q", c1, x);
  CATCH_CHECK(g1.sizes() == at::IntArrayRef({2, 1, 1}));
  CATCH_CHECK(test::max_abs_diff(g1, expect(w1, b1)) < 1e-6);
  CATCH_CHECK(test::max_abs_diff(bank.gate("layers.0.attn.q", c2, x), expect(w2, b2)) < 1e-6);
  CATCH_CHECK(bank.gate("layers.0.attn.q", c1, x).is_alias_of(g1));  // read back, not computed again
  {
    at::NoGradGuard no_grad;
    w1.add_(0.5);  // an optimizer's in-place step
  }
  CATCH_CHECK(test::max_abs_diff(bank.gate("layers.0.attn.q", c1, x), expect(w1, b1)) < 1e-6);
  {
    at::NoGradGuard no_grad;
    x.mul_(-1);  // the input changed in place
  }
  CATCH_CHECK(test::max_abs_diff(bank.gate("layers.0.attn.q", c2, x), expect(w2, b2)) < 1e-6);
  x = at::randn({2, 5, 4});  // another tensor
  CATCH_CHECK(test::max_abs_diff(bank.gate("layers.0.attn.q", c1, x), expect(w1, b1)) < 1e-6);
}
