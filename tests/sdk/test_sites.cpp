// The documented execution order of every site kind, on small tensors with known math.
#include "support.h"

#include <tessera/dense_linear.h>
#include <tessera/sites.h>

using namespace tessera;
using tessera::test::max_abs_diff;

CATCH_TEST_CASE("parameter and linear sites: (W + ΣΔW)(x ∘ s_in) + b, then ∘ s_out, then + Σ branch(x)", "[sdk][sites]") {
  at::manual_seed(1);
  ParameterSite w("w", "", at::randn({3, 4})), b("b", "", at::randn({3}));
  LinearSite site("lin", "hf.lin", &w, &b);
  Tensor x = at::randn({2, 5, 4});  // (B, T, in)
  CATCH_CHECK(max_abs_diff(site.forward(x), tessera::dense_linear(x, w.base(), b.base())) == 0);  // the plain product, bit for bit

  Tensor dw = at::randn({3, 4}), dw2 = at::randn({3, 4}), s_in = at::rand({4}), s_out = at::rand({3}), pd = at::randn({3, 4});
  w.add_delta("p", [=] { return pd; });
  site.add_weight_delta("a", [=] { return dw; });
  site.add_weight_delta("b", [=] { return dw2; });
  site.add_input_scale("a", [=] { return s_in; });
  site.add_output_scale("a", [=] { return s_out; });
  site.add_branch("a", [](const Tensor& in) { return in.narrow(-1, 0, 3) * 2; });
  site.add_branch("b", [](const Tensor& in) { return in.narrow(-1, 1, 3); });
  Tensor expect = (at::matmul(x * s_in, (w.base() + pd + dw + dw2).t()) + b.base()) * s_out + x.narrow(-1, 0, 3) * 2 + x.narrow(-1, 1, 3);
  CATCH_CHECK(max_abs_diff(site.forward(x), expect) < 1e-5);

  site.remove("a");
  site.remove("b");
  w.remove("p");
  CATCH_CHECK(max_abs_diff(site.forward(x), tessera::dense_linear(x, w.base(), b.base())) == 0);  // the plain product, bit for bit
}

CATCH_TEST_CASE("linear site with an activation: act(site(x)) ∘ times, output scales and branches before the activation", "[sdk][sites]") {
  at::manual_seed(2);
  ParameterSite w("w", "", at::randn({3, 4})), b("b", "", at::randn({3}));
  LinearSite site("lin", "hf.lin", &w, &b);
  Tensor x = at::randn({2, 5, 4}), times = at::randn({2, 5, 3}), s_out = at::rand({3});
  at::NoGradGuard no_grad;  // the fused kernel's path
  CATCH_CHECK(max_abs_diff(site.forward(x, Activation::silu, times), at::silu(at::linear(x, w.base(), b.base())) * times) < 1e-5);
  site.add_output_scale("a", [=] { return s_out; });
  site.add_branch("a", [](const Tensor& in) { return in.narrow(-1, 0, 3); });
  CATCH_CHECK(max_abs_diff(site.forward(x, Activation::relu, times),
                           at::relu(at::linear(x, w.base(), b.base()) * s_out + x.narrow(-1, 0, 3)) * times) < 1e-5);
}

CATCH_TEST_CASE("sublayer site: sequential in order, then + parallel(x), then ∘ gate(x)", "[sdk][sites]") {
  SublayerSite s("layers.0.attn", "", 4);
  Tensor x = at::randn({2, 3, 4}), h = at::randn({2, 3, 4});
  s.add_sequential("a", [](const Tensor& t) { return t + 1; });
  s.add_sequential("b", [](const Tensor& t) { return t * 3; });  // order matters: (h + 1) * 3
  s.add_parallel("c", [](const Tensor& t) { return t * 2; });
  s.add_gate("d", [](const Tensor& t) { return at::full({1}, 0.5, t.options()); });
  CATCH_CHECK(max_abs_diff(s.apply(x, h), ((h + 1) * 3 + x * 2) * 0.5) < 1e-6);
}

CATCH_TEST_CASE("attention site: prefixes concatenate along keys, score hooks run in order", "[sdk][sites]") {
  AttentionSite a("layers.0.attn", "", 2, 3);
  CATCH_CHECK_FALSE(a.has_prefix());
  a.add_prefix("p", [](std::int64_t B) { return std::make_pair(at::zeros({B, 2, 1, 3}), at::ones({B, 2, 1, 3})); });
  a.add_prefix("q", [](std::int64_t B) { return std::make_pair(at::ones({B, 2, 2, 3}), at::zeros({B, 2, 2, 3})); });
  auto [k, v] = a.prefix(4);
  CATCH_CHECK(k.sizes() == at::IntArrayRef({4, 2, 3, 3}));
  CATCH_CHECK(k.select(2, 0).sum().item<double>() == 0);
  CATCH_CHECK(v.select(2, 0).sum().item<double>() == 4 * 2 * 3);
  a.add_score_hook("h1", [](const Tensor& s) { return s + 1; });
  a.add_score_hook("h2", [](const Tensor& s) { return s * 2; });
  CATCH_CHECK(a.hook_scores(at::zeros({1})).item<double>() == 2);  // (0 + 1) * 2
}

CATCH_TEST_CASE("embedding site: prompts prepended in install order", "[sdk][sites]") {
  EmbeddingSite e("embed", "", 4);
  e.add_prompt("a", [](std::int64_t B) { return at::full({B, 2, 4}, 1.0); });
  e.add_prompt("b", [](std::int64_t B) { return at::full({B, 1, 4}, 2.0); });
  std::int64_t P = 0;
  Tensor out = e.prepend(at::zeros({3, 5, 4}), &P);
  CATCH_CHECK(P == 3);
  CATCH_CHECK(out.sizes() == at::IntArrayRef({3, 8, 4}));
  CATCH_CHECK(out.select(1, 0).mean().item<double>() == 1);
  CATCH_CHECK(out.select(1, 2).mean().item<double>() == 2);
  CATCH_CHECK(out.select(1, 3).abs().sum().item<double>() == 0);
}

CATCH_TEST_CASE("layer site: routers choose which tokens take the layer, taps see the result", "[sdk][sites]") {
  LayerSite l("layers.0", "", 0);
  Tensor h = at::randn({2, 3, 4}), seen;
  l.add_router("r", [](const Tensor& x) {
    Tensor keep = at::ones({x.size(0), x.size(1)});
    keep.select(1, 1).zero_();  // token 1 skips the layer
    return keep;
  });
  l.add_tap("t", [&](const Tensor& x) { seen = x; });
  Tensor out = l.run(h, [](const Tensor& x) { return x * 10; });
  CATCH_CHECK(max_abs_diff(out.select(1, 0), h.select(1, 0) * 10) < 1e-6);
  CATCH_CHECK(max_abs_diff(out.select(1, 1), h.select(1, 1)) == 0);
  CATCH_CHECK(max_abs_diff(seen, out) == 0);
}
