// The attention core against its formula, dropout(softmax(QKᵀ·scale + mask)) V: without
// dropout (any path) against float64, and in training with dropout on the CPU, where it
// runs the formula itself with tessera::dropout — checked draw for draw by seeding the
// same dropout call in the reference.
#include "support.h"

#include "architectures/attention.h"

#include <tessera/dropout.h>

#include <cmath>
#include <limits>

using namespace tessera;
using tessera::test::max_abs_diff;

namespace {

// float64 or float32 reference; keep (…, T, S) bool; p applied with tessera::dropout.
Tensor formula(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& keep, double p, double scale) {
  Tensor scores = at::matmul(q, k.transpose(-1, -2)) * scale;  // (B, nh, T, S)
  scores = scores.masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity());
  return at::matmul(tessera::dropout(at::softmax(scores, -1), p, true), v);
}

}  // namespace

CATCH_TEST_CASE("attention equals its formula with and without dropout, causal or masked", "[model][attention]") {
  if (!test::device().is_cpu()) return;  // the dropout path is the CPU's (dropout.h)
  AttentionSiteImpl site("layers.0.attn", "layers.0.attention", 4, 8);
  at::manual_seed(3);
  Tensor q = at::randn({2, 4, 6, 8}), k = at::randn({2, 4, 6, 8}), v = at::randn({2, 4, 6, 8});  // (B, nh, T, hd)
  Tensor causal = at::ones({1, 1, 6, 6}, at::kBool).tril();
  Tensor padded = at::ones({2, 1, 1, 6}, at::kBool);  // the second row's last two keys are padding
  padded[1].narrow(-1, 4, 2).fill_(false);
  const double scale = 1.0 / std::sqrt(8.0);
  auto f64 = [](const Tensor& t) { return t.to(at::kDouble); };
  for (const bool is_causal : {true, false}) {
    const Tensor keep = is_causal ? causal : padded;
    CATCH_INFO((is_causal ? "causal" : "padding mask"));
    // Evaluation, and training without dropout: the fused kernels, against float64.
    const Tensor expected = formula(f64(q), f64(k), f64(v), keep, 0.0, scale);
    const Tensor given = is_causal ? Tensor() : keep;
    CATCH_CHECK(max_abs_diff(attend(q, k, v, given, 0.1, false, site, {}, std::nullopt, is_causal), expected) < 1e-5);
    CATCH_CHECK(max_abs_diff(attend(q, k, v, given, 0.0, true, site, {}, std::nullopt, is_causal), expected) < 1e-5);
    // Training with dropout: the same draws as tessera::dropout on the probabilities.
    at::manual_seed(17);
    const Tensor dropped = attend(q, k, v, given, 0.25, true, site, {}, std::nullopt, is_causal);
    at::manual_seed(17);
    const Tensor reference = formula(q, k, v, keep, 0.25, scale);
    CATCH_CHECK(max_abs_diff(dropped, reference) < 1e-5);
    CATCH_CHECK(max_abs_diff(dropped, expected) > 1e-2);  // something was dropped
  }
}

CATCH_TEST_CASE("attention with dropout in training passes gradients to q, k and v", "[model][attention]") {
  AttentionSiteImpl site("layers.0.attn", "layers.0.attention", 2, 4);
  Tensor q = at::randn({1, 2, 5, 4}, test::options()).requires_grad_(), k = at::randn({1, 2, 5, 4}, test::options()).requires_grad_();
  Tensor v = at::randn({1, 2, 5, 4}, test::options()).requires_grad_();
  attend(q, k, v, {}, 0.1, true, site, {}, std::nullopt, true).sum().backward();
  for (const Tensor& t : {q, k, v}) CATCH_CHECK((t.grad().defined() && t.grad().abs().sum().item<double>() > 0));
}
