// The documented execution order of every site kind, on small tensors with known math.
#include "support.h"

#include <tessera/dense_linear.h>
#include <tessera/internal/sites_impl.h>

using namespace tessera;
using tessera::test::max_abs_diff;
using tessera::test::owner;

CATCH_TEST_CASE("parameter and linear sites: (W + ΣΔW)(x ∘ s_in) + b, then ∘ s_out, then + Σ branch(x)", "[sdk][sites]") {
  at::manual_seed(1);
  ParameterSiteImpl w("w", "", at::randn({3, 4})), b("b", "", at::randn({3}));
  LinearSiteImpl site("lin", "hf.lin", &w, &b);
  Tensor x = at::randn({2, 5, 4});  // (B, T, in)
  CATCH_CHECK(max_abs_diff(site.forward(x), tessera::dense_linear(x, w.base(), b.base())) == 0);  // the plain product, bit for bit

  Tensor dw = at::randn({3, 4}), dw2 = at::randn({3, 4}), s_in = at::rand({4}), s_out = at::rand({3}), pd = at::randn({3, 4});
  w.add_delta(owner("p"), [=] { return pd; });
  site.add_weight_delta(owner("a"), [=] { return dw; });
  site.add_weight_delta(owner("b"), [=] { return dw2; });
  site.add_input_scale(owner("a"), [=] { return s_in; });
  site.add_output_scale(owner("a"), [=] { return s_out; });
  site.add_branch(owner("a"), [](const Tensor& in) { return in.narrow(-1, 0, 3) * 2; });
  site.add_branch(owner("b"), [](const Tensor& in) { return in.narrow(-1, 1, 3); });
  Tensor expect = (at::matmul(x * s_in, (w.base() + pd + dw + dw2).t()) + b.base()) * s_out + x.narrow(-1, 0, 3) * 2 + x.narrow(-1, 1, 3);
  CATCH_CHECK(max_abs_diff(site.forward(x), expect) < 1e-5);

  site.remove(owner("a"));
  site.remove(owner("b"));
  w.remove(owner("p"));
  CATCH_CHECK(max_abs_diff(site.forward(x), tessera::dense_linear(x, w.base(), b.base())) == 0);  // the plain product, bit for bit
}

CATCH_TEST_CASE("parameter site: a sparse delta moves its k entries only, its gradient is k numbers, bad indices are refused by name (SDK 2.4)", "[sdk][sites]") {
  const Tensor base = at::randn({3, 4});
  ParameterSiteImpl w("layers.0.attn.q.weight", "", base);
  const Tensor dense = at::randn({3, 4});
  w.add_delta(owner("d"), [=] { return dense; });
  const Tensor idx = at::tensor({1, 6, 11}, at::kLong);
  const Tensor vals = at::tensor({0.5, -2.0, 3.0}, at::kFloat).set_requires_grad(true);
  w.add_sparse_delta(owner("s"), idx, [=] { return vals; });
  CATCH_CHECK(w.has_deltas());
  Tensor expected = (base + dense).reshape({-1}).clone();
  expected[1] += 0.5, expected[6] += -2.0, expected[11] += 3.0;
  const Tensor v = w.value();
  CATCH_CHECK(max_abs_diff(v.reshape({-1}), expected) < 1e-6);
  const Tensor g = at::arange(12, at::kFloat).view({3, 4});
  (v * g).sum().backward();
  CATCH_CHECK(at::equal(vals.grad(), at::tensor({1.0, 6.0, 11.0}, at::kFloat)));  // the gradient at the k entries only
  owner("s").set_scale(0.5);
  expected[1] -= 0.25, expected[6] -= -1.0, expected[11] -= 1.5;
  CATCH_CHECK(max_abs_diff(w.value().reshape({-1}), expected) < 1e-6);
  owner("s").set_scale(1.0);
  w.remove(owner("s"));
  CATCH_CHECK(at::equal(w.value(), base + dense));
  CATCH_CHECK_THROWS_WITH(w.add_sparse_delta(owner("s"), at::tensor({0, 12}, at::kLong), [=] { return vals; }),
                          Catch::Contains("'layers.0.attn.q.weight'") && Catch::Contains("index 12 falls outside its 12 entries"));
  CATCH_CHECK_THROWS_WITH(w.add_sparse_delta(owner("s"), at::tensor({3, 5, 3}, at::kLong), [=] { return vals; }),
                          Catch::Contains("'layers.0.attn.q.weight'") && Catch::Contains("indices repeat"));
  w.add_sparse_delta(owner("s"), at::tensor({3, 5}, at::kLong), [=] { return vals; });
  CATCH_CHECK_THROWS_WITH(w.value(), Catch::Contains("returned [3] values for 2 indices"));
  w.remove(owner("s"));
  w.remove(owner("d"));
}

CATCH_TEST_CASE("linear site with an activation: act(site(x)) ∘ times, output scales and branches before the activation", "[sdk][sites]") {
  at::manual_seed(2);
  ParameterSiteImpl w("w", "", at::randn({3, 4})), b("b", "", at::randn({3}));
  LinearSiteImpl site("lin", "hf.lin", &w, &b);
  Tensor x = at::randn({2, 5, 4}), times = at::randn({2, 5, 3}), s_out = at::rand({3});
  at::NoGradGuard no_grad;  // the fused kernel's path
  CATCH_CHECK(max_abs_diff(site.forward(x, Activation::silu, times), at::silu(at::linear(x, w.base(), b.base())) * times) < 1e-5);
  site.add_output_scale(owner("a"), [=] { return s_out; });
  site.add_branch(owner("a"), [](const Tensor& in) { return in.narrow(-1, 0, 3); });
  CATCH_CHECK(max_abs_diff(site.forward(x, Activation::relu, times),
                           at::relu(at::linear(x, w.base(), b.base()) * s_out + x.narrow(-1, 0, 3)) * times) < 1e-5);
}

CATCH_TEST_CASE("sublayer site: sequential in order, then + parallel(x), then ∘ gate(x)", "[sdk][sites]") {
  SublayerSiteImpl s("layers.0.attn", "", 4);
  Tensor x = at::randn({2, 3, 4}), h = at::randn({2, 3, 4});
  s.add_sequential(owner("a"), [](const Tensor& t) { return t + 1; });
  s.add_sequential(owner("b"), [](const Tensor& t) { return t * 3; });  // order matters: (h + 1) * 3
  s.add_parallel(owner("c"), [](const Tensor& t) { return t * 2; });
  s.add_gate(owner("d"), [](const Tensor& t) { return at::full({1}, 0.5, t.options()); });
  CATCH_CHECK(max_abs_diff(s.apply(x, h, x, SublayerSiteImpl::identity()), ((h + 1) * 3 + x * 2) * 0.5) < 1e-6);
}

CATCH_TEST_CASE("sublayer site: a residual module sees h, the residual and the block's norm, in the sequential install order (SDK 2.3)", "[sdk][sites]") {
  SublayerSiteImpl s("layers.0.mlp", "", 4);
  Tensor x = at::randn({2, 3, 4}), h = at::randn({2, 3, 4}), r = at::randn({2, 3, 4});
  const TensorMap norm = [](const Tensor& t) { return t * 10; };
  s.add_token_wise_sequential(owner("a"), [](const Tensor& t) { return t + 1; });
  s.add_token_wise_residual(owner("b"), [](const Tensor& t, const Tensor& res, const TensorMap& n) { return t + n(t + res) * 2; });
  s.add_token_wise_sequential(owner("c"), [](const Tensor& t) { return t * 3; });
  CATCH_CHECK(s.token_wise());
  const Tensor h1 = h + 1;
  CATCH_CHECK(max_abs_diff(s.apply(x, h, r, norm), (h1 + (h1 + r) * 20) * 3) < 1e-5);
}

CATCH_TEST_CASE("attention site: prefixes concatenate along keys, score hooks run in order", "[sdk][sites]") {
  AttentionSiteImpl a("layers.0.attn", "", 2, 3);
  CATCH_CHECK_FALSE(a.has_prefix());
  a.add_prefix(owner("p"), [](std::int64_t B) { return std::make_pair(at::zeros({B, 2, 1, 3}), at::ones({B, 2, 1, 3})); });
  a.add_prefix(owner("q"), [](std::int64_t B) { return std::make_pair(at::ones({B, 2, 2, 3}), at::zeros({B, 2, 2, 3})); });
  auto [k, v] = a.prefix(4);
  CATCH_CHECK(k.sizes() == at::IntArrayRef({4, 2, 3, 3}));
  CATCH_CHECK(k.select(2, 0).sum().item<double>() == 0);
  CATCH_CHECK(v.select(2, 0).sum().item<double>() == 4 * 2 * 3);
  a.add_score_hook(owner("h1"), [](const Tensor& s) { return s + 1; });
  a.add_score_hook(owner("h2"), [](const Tensor& s) { return s * 2; });
  CATCH_CHECK(a.hook_scores(at::zeros({1})).item<double>() == 2);  // (0 + 1) * 2
}

CATCH_TEST_CASE("embedding site: prompts prepended in install order", "[sdk][sites]") {
  EmbeddingSiteImpl e("embed", "", 4);
  e.add_prompt(owner("a"), [](std::int64_t B) { return at::full({B, 2, 4}, 1.0); });
  e.add_prompt(owner("b"), [](std::int64_t B) { return at::full({B, 1, 4}, 2.0); });
  std::int64_t P = 0;
  Tensor out = e.prepend(at::zeros({3, 5, 4}), &P);
  CATCH_CHECK(P == 3);
  CATCH_CHECK(out.sizes() == at::IntArrayRef({3, 8, 4}));
  CATCH_CHECK(out.select(1, 0).mean().item<double>() == 1);
  CATCH_CHECK(out.select(1, 2).mean().item<double>() == 2);
  CATCH_CHECK(out.select(1, 3).abs().sum().item<double>() == 0);
}

CATCH_TEST_CASE("layer site: a parallel module adds to every token, routed or not, before the taps (SDK 2.3)", "[sdk][sites]") {
  LayerSiteImpl l("layers.0", "", 0);
  Tensor h = at::randn({2, 3, 4}), seen;
  l.add_router(owner("r"), [](const Tensor& x) {
    Tensor keep = at::full({x.size(0), x.size(1)}, 0.5);
    keep.select(1, 1).zero_();  // token 1 skips the layer; the others blend by ½
    return keep;
  });
  auto& p = owner("p");
  l.add_parallel(p, [](const Tensor& x) { return x * 3; });
  l.add_tap(owner("t"), [&](const Tensor& x) { seen = x; });
  CATCH_CHECK_FALSE(l.empty());
  Tensor out = l.run(h, [&](const Tensor& x, const Tensor&) { return x * 10; });
  CATCH_CHECK(max_abs_diff(out.select(1, 0), h.select(1, 0) * (5 + 0.5 + 3)) < 1e-5);
  CATCH_CHECK(max_abs_diff(out.select(1, 1), h.select(1, 1) * 4) < 1e-5);
  CATCH_CHECK(at::equal(seen, out));
  p.set_scale(0.5);
  CATCH_CHECK(max_abs_diff(l.run(h, [&](const Tensor& x, const Tensor&) { return x * 10; }).select(1, 1), h.select(1, 1) * 2.5) < 1e-5);
}

CATCH_TEST_CASE("layer site: routers choose which tokens take the layer, taps see the result", "[sdk][sites]") {
  LayerSiteImpl l("layers.0", "", 0);
  Tensor h = at::randn({2, 3, 4}), seen;
  l.add_router(owner("r"), [](const Tensor& x) {
    Tensor keep = at::ones({x.size(0), x.size(1)});
    keep.select(1, 1).zero_();  // token 1 skips the layer
    return keep;
  });
  l.add_tap(owner("t"), [&](const Tensor& x) { seen = x; });
  Tensor kept;
  Tensor out = l.run(h, [&](const Tensor& x, const Tensor& k) {
    kept = k;  // the layer is told which tokens to run on
    return x * 10;
  });
  CATCH_CHECK(at::equal(kept, at::tensor({1, 0, 1}).ne(0).expand({2, 3})));
  CATCH_CHECK(max_abs_diff(out.select(1, 0), h.select(1, 0) * 10) < 1e-6);
  CATCH_CHECK(max_abs_diff(out.select(1, 1), h.select(1, 1)) == 0);
  CATCH_CHECK(max_abs_diff(seen, out) == 0);
}

CATCH_TEST_CASE("owners: the host's scale and switch act on every kind as documented, and α = 1 changes no bit", "[sdk][sites]") {
  at::manual_seed(3);
  auto o = OwnerImpl::create("test", "scaled");
  ParameterSiteImpl w("w", "", at::randn({3, 4})), b("b", "", at::randn({3}));
  LinearSiteImpl site("lin", "", &w, &b);
  Tensor x = at::randn({2, 4}), dw = at::randn({3, 4}), s_in = at::rand({4}), s_out = at::rand({3}), pd = at::randn({3, 4});
  w.add_delta(*o, [=] { return pd; });
  site.add_weight_delta(*o, [=] { return dw; });
  site.add_input_scale(*o, [=] { return s_in; });
  site.add_output_scale(*o, [=] { return s_out; });
  site.add_branch(*o, [](const Tensor& in) { return in.narrow(-1, 0, 3); });
  const Tensor full = site.forward(x);
  o->set_scale(1.0);
  CATCH_CHECK(max_abs_diff(site.forward(x), full) == 0);
  for (double a : {0.0, 0.5, 2.0}) {
    o->set_scale(a);
    const Tensor expect = (at::matmul(x * (1 + a * (s_in - 1)), (w.base() + a * pd + a * dw).t()) + b.base()) * (1 + a * (s_out - 1)) +
                          a * x.narrow(-1, 0, 3);
    CATCH_CHECK(max_abs_diff(site.forward(x), expect) < 1e-5);
  }
  o->set_scale(1.0);
  o->set_enabled(false);  // as if absent: the plain product, bit for bit
  CATCH_CHECK_FALSE(site.has_interventions());
  CATCH_CHECK(max_abs_diff(site.forward(x), tessera::dense_linear(x, w.base(), b.base())) == 0);
  o->set_enabled(true);
  CATCH_CHECK(max_abs_diff(site.forward(x), full) == 0);

  SublayerSiteImpl sub("layers.0.mlp", "", 4);
  Tensor h = at::randn({2, 3, 4}), xs = at::randn({2, 3, 4});
  sub.add_sequential(*o, [](const Tensor& t) { return t * 3; });
  sub.add_parallel(*o, [](const Tensor& t) { return t * 2; });
  sub.add_gate(*o, [](const Tensor& t) { return at::full({1}, 0.5, t.options()); });
  o->set_scale(0.5);  // seq: h + ½(3h − h) = 2h; + ½·2x; gate 1 + ½(0.5 − 1) = 0.75
  CATCH_CHECK(max_abs_diff(sub.apply(xs, h, xs, SublayerSiteImpl::identity()), (2 * h + xs) * 0.75) < 1e-6);
  AttentionSiteImpl att("layers.0.attn", "", 1, 1);
  att.add_score_hook(*o, [](const Tensor& s) { return s + 4; });
  CATCH_CHECK(att.hook_scores(at::zeros({1})).item<double>() == 2);

  // The owner's removal reaches every site it touched.
  CATCH_CHECK(o->site_count() == 4);
  o->remove_all();
  CATCH_CHECK(o->site_count() == 0);
  CATCH_CHECK(sub.empty());
  CATCH_CHECK_FALSE(att.has_score_hooks());
  CATCH_CHECK_FALSE(w.has_deltas());
}

CATCH_TEST_CASE("a closure that throws is named by plugin, instance and site", "[sdk][sites]") {
  auto o = OwnerImpl::create("lora", "mine");
  ParameterSiteImpl w("layers.3.attn.q.weight", "", at::randn({3, 4}));
  LinearSiteImpl site("layers.3.attn.q", "", &w, nullptr);
  site.add_branch(*o, [](const Tensor&) -> Tensor { throw std::runtime_error("shape mismatch"); });
  CATCH_CHECK_THROWS_WITH(site.forward(at::randn({2, 4})), "plugin 'lora' (instance 'mine') at site 'layers.3.attn.q': shape mismatch");
  site.remove(*o);
  // libtorch's errors arrive without their C++ backtrace.
  LayerSiteImpl layer("layers.1", "", 1);
  layer.add_router(*o, [](const Tensor& h) { return at::matmul(h, at::ones({5, 5})); });
  try {
    layer.run(at::randn({2, 3, 4}), [](const Tensor& t, const Tensor&) { return t; });
    CATCH_FAIL("no error");
  } catch (const std::exception& e) {
    const std::string what = e.what();
    CATCH_CHECK(what.rfind("plugin 'lora' (instance 'mine') at site 'layers.1': ", 0) == 0);
    CATCH_CHECK(what.find("Exception raised from") == std::string::npos);
  }
}

CATCH_TEST_CASE("a site that goes before its owner tells the owner", "[sdk][sites]") {
  auto o = OwnerImpl::create("test", "outlives");
  {
    EmbeddingSiteImpl e("embed", "", 4);
    e.add_prompt(*o, [](std::int64_t B) { return at::zeros({B, 1, 4}); });
    CATCH_CHECK(o->site_count() == 1);
  }
  CATCH_CHECK(o->site_count() == 0);
  o->remove_all();  // nothing left to touch
}
