// The chunked head loss against the formula it replaces: log-softmax cross-entropy of the
// whole logits (B·T × V) through libtorch's autograd, in f64, over several chunks.
#include "support.h"

#include "tasks/head_loss.h"

#include <tessera/internal/sites_impl.h>

using namespace tessera;

namespace {

struct Head {  // a head site (V, H) with bias, as a model owns one
  ParameterSiteImpl w, b;
  LinearSiteImpl site;
  Head(const Tensor& weight, const Tensor& bias)
      : w("head.weight", "lm_head.weight", weight), b("head.bias", "lm_head.bias", bias), site("head", "lm_head", &w, &b) {}
};

Tensor whole_loss(const Tensor& h, const Tensor& w, const Tensor& b, const Tensor& t) {
  return -at::log_softmax(at::linear(h, w, b), 1).gather(1, t.unsqueeze(1)).sum();
}

}  // namespace

CATCH_TEST_CASE("chunked head loss equals whole-logit cross-entropy, value and gradients", "[train][head_loss]") {
  at::manual_seed(0);
  const std::int64_t N = 700, H = 24, V = 30000;  // 279 rows a chunk: three chunks, the last partial
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Tensor weight = at::randn({V, H}, f64) * 0.3, bias = at::randn({V}, f64) * 0.1;
  Tensor targets = at::randint(0, V, {N}, at::kLong);
  Head head(weight, bias);
  // Deltas that require grad make the weight and bias trainable, as BitFit or a tied
  // embedding's delta would.
  Tensor dw = at::zeros({V, H}, f64).requires_grad_(), db = at::zeros({V}, f64).requires_grad_();
  head.w.add_delta(test::owner("test"), [&] { return dw; });
  head.b.add_delta(test::owner("test"), [&] { return db; });
  Tensor h = at::randn({N, H}, f64).requires_grad_();

  Tensor ours = head_loss_sum(head.site, h, targets);
  ours.mul(0.5).backward();  // a scaled upstream gradient reaches every input
  Tensor gh = h.grad().clone(), gw = dw.grad().clone(), gb = db.grad().clone();
  h.mutable_grad().reset(), dw.mutable_grad().reset(), db.mutable_grad().reset();

  Tensor ref = whole_loss(h, weight + dw, bias + db, targets);
  ref.mul(0.5).backward();
  CATCH_CHECK(std::abs(ours.item<double>() - ref.item<double>()) < 1e-6 * std::abs(ref.item<double>()));
  CATCH_CHECK(test::max_abs_diff(gh, h.grad()) < 1e-10);
  CATCH_CHECK(test::max_abs_diff(gw, dw.grad()) < 1e-10);
  CATCH_CHECK(test::max_abs_diff(gb, db.grad()) < 1e-10);

  const HeadStats s = head_stats(head.site, h, targets);
  CATCH_CHECK(std::abs(s.loss_sum - ref.item<double>()) < 1e-6 * std::abs(ref.item<double>()));
  at::NoGradGuard no_grad;
  CATCH_CHECK(s.correct == at::linear(h, weight, bias).argmax(1).eq(targets).sum().item<std::int64_t>());
}

CATCH_TEST_CASE("a head with interventions runs its own forward, and unlabelled rows never reach it", "[train][head_loss]") {
  at::manual_seed(1);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Tensor weight = at::randn({50, 8}, f64), bias = at::randn({50}, f64);
  Head head(weight, bias);
  Tensor a = at::randn({50, 8}, f64).requires_grad_();
  head.site.add_branch(test::owner("branch"), [&](const Tensor& x) { return at::linear(x, a); });  // (…, 8) -> (…, 50)
  Tensor hidden = at::randn({2, 5, 8}, f64);
  Tensor labels = at::randint(0, 50, {2, 5}, at::kLong);
  labels.index_put_({0, at::indexing::Slice(3)}, -100);  // padding
  auto [rows, next] = labelled_rows(hidden, labels);
  CATCH_REQUIRE(rows.size(0) == 8);
  CATCH_CHECK(next.eq(-100).sum().item<std::int64_t>() == 0);
  Tensor ours = head_loss_sum(head.site, rows, next);
  Tensor ref = at::cross_entropy_loss((at::linear(hidden, weight, bias) + at::linear(hidden, a)).reshape({10, 50}), labels.reshape({10}), {},
                                      at::Reduction::Sum, -100);
  CATCH_CHECK(std::abs(ours.item<double>() - ref.item<double>()) < 1e-9);
  ours.backward();
  CATCH_CHECK(a.grad().defined());
}
