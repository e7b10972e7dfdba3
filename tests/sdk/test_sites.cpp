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

CATCH_TEST_CASE("embedding site: transforms chain in install order before the taps (SDK 2.7)", "[sdk][sites]") {
  EmbeddingSiteImpl e("embed", "", 4);
  Tensor seen;
  e.add_tap(owner("t"), [&](const Tensor& x) { seen = x; });
  const Tensor x0 = at::randn({2, 3, 4});
  CATCH_CHECK(at::equal(e.enter(x0), x0));  // nothing installed: x0 itself
  e.add_transform(owner("a"), [](const Tensor& x) { return x + 1; });
  e.add_transform(owner("b"), [](const Tensor& x) { return x * 2; });
  const Tensor out = e.enter(x0);
  CATCH_CHECK(max_abs_diff(out, (x0 + 1) * 2) < 1e-6);
  CATCH_CHECK(max_abs_diff(seen, out) == 0);  // the taps see what layer 0 reads
  e.remove(owner("a"));
  CATCH_CHECK(max_abs_diff(e.enter(x0), x0 * 2) < 1e-6);
}

CATCH_TEST_CASE("output site: transforms chain in install order, and only those not token-wise read the sequence (SDK 2.7)", "[sdk][sites]") {
  OutputSiteImpl o("output", "", 4);
  const Tensor h = at::randn({2, 3, 4});
  CATCH_CHECK_FALSE(o.reads_sequence());
  o.add_token_wise_transform(owner("inv"), [](const Tensor& x) { return x * 2; });
  CATCH_CHECK_FALSE(o.reads_sequence());  // generation may keep its KV cache
  CATCH_CHECK(max_abs_diff(o.apply(h), h * 2) < 1e-6);
  o.add_transform(owner("side"), [](const Tensor& x) { return x.cumsum(1); });  // reads earlier positions
  CATCH_CHECK(o.reads_sequence());
  CATCH_CHECK(max_abs_diff(o.apply(h), (h * 2).cumsum(1)) < 1e-5);
  o.remove(owner("side"));
  CATCH_CHECK_FALSE(o.reads_sequence());
}

CATCH_TEST_CASE("layer site: input taps see the layer's input before the routers and the layer (SDK 2.7)", "[sdk][sites]") {
  LayerSiteImpl l("decoder.layers.0", "", 0);
  const Tensor h = at::randn({2, 3, 4});
  Tensor seen_in, seen_by_router;
  CATCH_CHECK(l.empty());
  l.add_input_tap(owner("in"), [&](const Tensor& x) {
    CATCH_CHECK_FALSE(seen_by_router.defined());  // before the router
    seen_in = x;
  });
  CATCH_CHECK_FALSE(l.empty());
  l.add_router(owner("r"), [&](const Tensor& x) {
    seen_by_router = x;
    return at::ones({x.size(0), x.size(1)});
  });
  const Tensor out = l.run(h, [](const Tensor& x, const Tensor&) { return x * 3; });
  CATCH_CHECK(at::equal(seen_in, h));
  CATCH_CHECK_FALSE(seen_in.requires_grad());
  CATCH_CHECK(max_abs_diff(out, h * 3) < 1e-6);
  l.remove(owner("in"));
  l.remove(owner("r"));
  CATCH_CHECK(l.empty());
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

namespace {

// A factor with known values: per sample f_b for tokens (…, 1), f_b for prefixes, c for parameters.
class KnownFactor final : public ContributionFactor {
 public:
  KnownFactor(Tensor per_sample, double scalar) : f_(std::move(per_sample)), c_(scalar) {}
  Tensor per_token(const std::string&, const Tensor& x) const override {
    std::vector<std::int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
    shape[0] = f_.size(0);
    return f_.reshape(shape);
  }
  Tensor per_sample(const std::string&, const Tensor&, std::int64_t) const override { return f_; }
  Tensor scalar(const std::string&) const override { return at::full({}, c_); }

 private:
  Tensor f_;
  double c_;
};

}  // namespace

CATCH_TEST_CASE("composition at the sites: a parallel group's chained modules read one input, factors weigh every kind per sample", "[sdk][sites]") {
  at::manual_seed(4);
  auto a = OwnerImpl::create("test", "a"), b = OwnerImpl::create("test", "b"), c = OwnerImpl::create("test", "c");
  SublayerSiteImpl sub("layers.0.mlp", "", 4);
  const Tensor h = at::randn({2, 3, 4}), x = at::randn({2, 3, 4});
  sub.add_sequential(*a, [](const Tensor& t) { return t * 3; });
  sub.add_sequential(*b, [](const Tensor& t) { return t + 1; });
  sub.add_sequential(*c, [](const Tensor& t) { return t * t; });
  const auto id = SublayerSiteImpl::identity();
  // Chained (no group): c(b(a(h))).
  CATCH_CHECK(max_abs_diff(sub.apply(x, h, x, id), (3 * h + 1) * (3 * h + 1)) < 1e-5);
  // a and b in one parallel group: h + (3h − h) + (h + 1 − h), then c chains after them.
  a->set_parallel_group(1), b->set_parallel_group(1);
  const Tensor ab = h + 2 * h + 1;
  CATCH_CHECK(max_abs_diff(sub.apply(x, h, x, id), ab * ab) < 1e-5);
  // An average: weights ¼ and ¾ on the changes.
  a->set_scale(0.25), b->set_scale(0.75);
  const Tensor avg = h + 0.25 * 2 * h + 0.75;
  CATCH_CHECK(max_abs_diff(sub.apply(x, h, x, id), avg * avg) < 1e-5);
  // A factor per sample on b's change (a gate, a route mask): sample 0 gets 0 of it, sample 1 all.
  const Tensor f = at::tensor({0.f, 1.f});
  b->set_scale(1.0);
  b->set_factors({std::make_shared<KnownFactor>(f, 0.5)});
  const Tensor got = sub.apply(x, h, x, id);
  const Tensor s0 = h[0] + 0.25 * 2 * h[0], s1 = h[1] + 0.25 * 2 * h[1] + 1;
  CATCH_CHECK(max_abs_diff(got[0], s0 * s0) < 1e-5);
  CATCH_CHECK(max_abs_diff(got[1], s1 * s1) < 1e-5);

  // A linear site: a factored weight delta runs as a branch on x ∘ s_in, scales and branches
  // move toward their value by the factor, a parameter delta takes the scalar.
  ParameterSiteImpl w("w", "", at::randn({3, 4})), bias("b", "", at::randn({3}));
  LinearSiteImpl lin("lin", "", &w, &bias);
  const Tensor xl = at::randn({2, 5, 4}), dw = at::randn({3, 4}), s_in = at::rand({4}), s_out = at::rand({3}), pd = at::randn({3, 4});
  auto g = OwnerImpl::create("test", "g");
  const Tensor fg = at::tensor({0.25f, 0.5f});
  g->set_factors({std::make_shared<KnownFactor>(fg, 0.5)});
  w.add_delta(*g, [=] { return pd; });
  lin.add_weight_delta(*g, [=] { return dw; });
  lin.add_input_scale(*g, [=] { return s_in; });
  lin.add_output_scale(*g, [=] { return s_out; });
  lin.add_branch(*g, [](const Tensor& in) { return in.narrow(-1, 0, 3); });
  for (std::int64_t s = 0; s < 2; ++s) {
    const double k = fg[s].item<double>();
    const Tensor xs = xl[s] * (1 + k * (s_in - 1));
    const Tensor expect = (at::matmul(xs, (w.base() + 0.5 * pd + k * dw).t()) + bias.base()) * (1 + k * (s_out - 1)) + k * xl[s].narrow(-1, 0, 3);
    CATCH_CHECK(max_abs_diff(lin.forward(xl)[s], expect) < 1e-5);
  }
  // What changes a shape or a path cannot be weighed: refused by name.
  EmbeddingSiteImpl emb("embed", "", 4);
  emb.add_prompt(*g, [](std::int64_t batch) { return at::zeros({batch, 2, 4}); });
  CATCH_CHECK_THROWS_WITH(emb.prepend(at::zeros({2, 3, 4}), nullptr), Catch::Contains("instance 'g'") && Catch::Contains("a prompt cannot be weighed"));
  // A prefix's keys and values are weighed per sample where the layer's input is at hand;
  // another owner's prefix beside it keeps its values.
  AttentionSiteImpl att("layers.0.attn", "", 1, 2);
  att.add_prefix(*g, [](std::int64_t batch) { return std::make_pair(at::ones({batch, 1, 3, 2}), at::ones({batch, 1, 3, 2}) * 2); });
  att.add_prefix(*a, [](std::int64_t batch) { return std::make_pair(at::ones({batch, 1, 1, 2}) * 3, at::ones({batch, 1, 1, 2}) * 3); });
  const auto whole = att.prefix(2);
  CATCH_CHECK(whole.first.size(2) == 4);
  CATCH_CHECK(max_abs_diff(whole.first.narrow(2, 0, 3), at::ones({2, 1, 3, 2})) == 0);  // not weighed before the layer
  const auto [pk, pv] = att.weigh_prefix(whole, at::randn({2, 5, 2}));
  CATCH_CHECK(max_abs_diff(pk.narrow(2, 3, 1), at::full({2, 1, 1, 2}, 3.0)) == 0);
  CATCH_CHECK(max_abs_diff(pk.select(0, 1).narrow(1, 0, 3), at::full({1, 3, 2}, 0.5)) == 0);  // sample 1: ½ · 1
  CATCH_CHECK(max_abs_diff(pv.select(0, 0).narrow(1, 0, 3), at::full({1, 3, 2}, 0.5)) == 0);  // sample 0: ¼ · 2
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

CATCH_TEST_CASE("a row-scaled branch gets the owner's per-row weight with α inside, or nothing and α outside (SDK 2.8)", "[sdk][sites]") {
  at::manual_seed(6);
  ParameterSiteImpl w("w", "", at::randn({3, 4})), bias("b", "", at::randn({3}));
  LinearSiteImpl lin("lin", "", &w, &bias);
  const Tensor x = at::randn({2, 5, 4});
  const Tensor base = lin.forward(x);
  auto o = OwnerImpl::create("test", "o");
  std::vector<Tensor> seen;  // the rows each call was handed
  lin.add_row_scaled_branch(*o, [&](const Tensor& in, const Tensor& rows) {
    seen.push_back(rows);
    const Tensor f = in.narrow(-1, 0, 3) * 2;  // f(x)
    return rows.defined() ? f * rows : f;
  });
  CATCH_CHECK(lin.has_interventions());
  CATCH_CHECK(static_cast<const SiteCore&>(lin).kinds(*o) == std::vector<std::string>{"a branch"});
  // No factor: rows undefined, the host applies α to f(x).
  o->set_scale(0.5);
  CATCH_CHECK_FALSE(lin.row_weights(*o, x).defined());
  CATCH_CHECK(max_abs_diff(lin.forward(x), base + 0.5 * 2 * x.narrow(-1, 0, 3)) < 1e-6);
  CATCH_REQUIRE(seen.size() == 1);
  CATCH_CHECK_FALSE(seen[0].defined());
  // A per-sample factor: rows = α · f_b, (B, 1, 1), and the host adds what the branch returns.
  const Tensor f = at::tensor({0.25f, 2.f});
  o->set_factors({std::make_shared<KnownFactor>(f, 0.5)});
  const Tensor got = lin.forward(x);
  CATCH_REQUIRE(seen.size() == 2);
  CATCH_CHECK(seen[1].sizes() == at::IntArrayRef({2, 1, 1}));
  CATCH_CHECK(max_abs_diff(seen[1].reshape({-1}), 0.5 * f) < 1e-7);
  CATCH_CHECK(max_abs_diff(lin.row_weights(*o, x), seen[1]) == 0);  // what a grouped branch reads ahead of the call
  for (std::int64_t s = 0; s < 2; ++s) CATCH_CHECK(max_abs_diff(got[s], base[s] + 0.5 * f[s].item<double>() * 2 * x[s].narrow(-1, 0, 3)) < 1e-6);
  o->set_enabled(false);
  CATCH_CHECK(max_abs_diff(lin.forward(x), base) == 0);
  o->set_enabled(true);
  lin.remove(*o);
  CATCH_CHECK_FALSE(lin.has_interventions());
}

CATCH_TEST_CASE("attention site: positionless prefixes come first among the keys and are not counted as earlier tokens (SDK 2.8)", "[sdk][sites]") {
  auto a = OwnerImpl::create("test", "a"), b = OwnerImpl::create("test", "b");
  AttentionSiteImpl att("layers.0.attn", "", 1, 2);
  att.add_prefix(*a, [](std::int64_t batch) { return std::make_pair(at::ones({batch, 1, 3, 2}), at::ones({batch, 1, 3, 2})); });
  att.add_positionless_prefix(*b, [](std::int64_t batch) { return std::make_pair(at::full({batch, 1, 2, 2}, 7.0), at::full({batch, 1, 2, 2}, 7.0)); });
  const auto kv = att.prefix(2);
  CATCH_CHECK(kv.first.size(2) == 5);
  CATCH_CHECK(max_abs_diff(kv.first.narrow(2, 0, 2), at::full({2, 1, 2, 2}, 7.0)) == 0);  // b's keys first
  CATCH_CHECK(max_abs_diff(kv.first.narrow(2, 2, 3), at::ones({2, 1, 3, 2})) == 0);
  CATCH_CHECK(att.positioned_prefix_length() == 3);
  // Weighed in the same key order: a factor on b scales the first two keys.
  b->set_factors({std::make_shared<KnownFactor>(at::tensor({0.5f, 0.f}), 1.0)});
  const auto [k, v] = att.weigh_prefix(kv, at::randn({2, 4, 2}));
  CATCH_CHECK(max_abs_diff(k.select(0, 0).narrow(1, 0, 2), at::full({1, 2, 2}, 3.5)) == 0);
  CATCH_CHECK(max_abs_diff(k.narrow(2, 2, 3), at::ones({2, 1, 3, 2})) == 0);
  a->set_enabled(false);
  att.prefix(2);
  CATCH_CHECK(att.positioned_prefix_length() == 0);
  CATCH_CHECK(static_cast<const SiteCore&>(att).kinds(*b) == std::vector<std::string>{"a prefix"});
}
