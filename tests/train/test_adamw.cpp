// The fused AdamW against the update rule of Loshchilov & Hutter (Algorithm 2, with
// Adam's bias correction), computed here step by step in float64.
#include "support.h"

#include "train/adamw.h"

#include <cmath>

using namespace tessera;

CATCH_TEST_CASE("fused AdamW follows the paper's update, leaving parameters without a gradient alone", "[train][optim]") {
  at::manual_seed(11);
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  std::vector<Tensor> a{at::randn({4, 3}, test::options()), at::randn({5}, test::options())}, b{at::randn({2, 2}, test::options())};
  FusedAdamW opt({{a, 1e-2, 0.1}, {b, 3e-2, 0.0}});
  // The reference: θ, m, v and t per tensor in float64.
  struct Ref {
    Tensor theta, m, v;
    int t = 0;
    double lr, wd;
  };
  std::vector<Ref> ref;
  for (auto& p : a) ref.push_back({p.to(at::kDouble), at::zeros_like(p, at::kDouble), at::zeros_like(p, at::kDouble), 0, 1e-2, 0.1});
  ref.push_back({b[0].to(at::kDouble), at::zeros_like(b[0], at::kDouble), at::zeros_like(b[0], at::kDouble), 0, 3e-2, 0.0});
  std::vector<Tensor*> params{&a[0], &a[1], &b[0]};
  for (int step = 0; step < 6; ++step) {
    opt.zero_grad();
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (i == 1 && step == 2) continue;  // no gradient this step: no update, no step count
      Tensor g = at::randn(params[i]->sizes(), test::options());
      params[i]->mutable_grad() = g;
      auto& r = ref[i];
      Tensor gd = g.to(at::kDouble);
      ++r.t;
      r.theta = r.theta * (1 - r.lr * r.wd);  // decoupled weight decay
      r.m = b1 * r.m + (1 - b1) * gd;
      r.v = b2 * r.v + (1 - b2) * gd * gd;
      Tensor m_hat = r.m / (1 - std::pow(b1, r.t)), v_hat = r.v / (1 - std::pow(b2, r.t));
      r.theta = r.theta - r.lr * m_hat / (v_hat.sqrt() + eps);
    }
    const Tensor skipped = a[1].clone();
    opt.step();
    if (step == 2) CATCH_CHECK(at::equal(a[1], skipped));
    for (std::size_t i = 0; i < params.size(); ++i) {
      CATCH_INFO("step " << step << ", tensor " << i);
      CATCH_CHECK(test::max_abs_diff(*params[i], ref[i].theta) < 1e-6);
    }
  }
  opt.zero_grad();
  CATCH_CHECK(!a[0].grad().defined());
}

CATCH_TEST_CASE("gradient clipping scales all gradients by one factor to the total norm", "[train][optim]") {
  at::manual_seed(12);
  std::vector<Tensor> ps{at::randn({3, 4}, test::options()), at::randn({7}, test::options()), at::randn({2}, test::options())};
  for (auto& p : ps) p.mutable_grad() = at::randn(p.sizes(), test::options()) * 3;
  ps[2].mutable_grad().reset();  // no gradient: not counted, not touched
  const double norm = std::sqrt(ps[0].grad().pow(2).sum().item<double>() + ps[1].grad().pow(2).sum().item<double>());
  CATCH_REQUIRE(norm > 2);
  std::vector<Tensor> before{ps[0].grad().clone(), ps[1].grad().clone()};
  CATCH_CHECK(std::abs(clip_grad_norm(ps, 2.0).item<double>() - norm) < 1e-4);
  const double scale = 2.0 / (norm + 1e-6);
  CATCH_CHECK(test::max_abs_diff(ps[0].grad(), before[0] * scale) < 1e-6);
  CATCH_CHECK(test::max_abs_diff(ps[1].grad(), before[1] * scale) < 1e-6);
  // Under the bound nothing changes.
  before = {ps[0].grad().clone(), ps[1].grad().clone()};
  clip_grad_norm(ps, 100.0);
  CATCH_CHECK(at::equal(ps[0].grad(), before[0]));
  CATCH_CHECK(!ps[2].grad().defined());
}
