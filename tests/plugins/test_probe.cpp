// The site order for every intervention kind, exercised through the plugin boundary by
// the probe plugin (tests/plugins/probe.cpp) on the real encoder — built against this
// tree's SDK ("probe") and against the frozen SDK 2.0 headers ("probe-2.0"): both must
// give the same known math in this host.
#include "support.h"

#include <tessera/dense_linear.h>

using namespace tessera;

namespace {

std::string probe_id = "probe";  // which build the current test case runs

std::unique_ptr<MethodInstance> probe(ModelView& model, const std::string& name, const std::string& kind, double value,
                                      std::vector<std::string> targets, std::int64_t length = 2) {
  auto inst = test::registry().create(probe_id, name);
  const auto* info = test::registry().find(probe_id);
  inst->attach(model, targets, apply_schema(info->params, {{"kind", kind}, {"value", value}, {"length", length}}));
  return inst;
}

}  // namespace

CATCH_TEST_CASE("linear and parameter interventions from several plugins compose in the documented order", "[plugins][probe][minilm]") {
  probe_id = GENERATE(as<std::string>{}, "probe", "probe-2.0");
  auto model = test::load_minilm();
  at::NoGradGuard no_grad;
  auto* site = &LinearSiteImpl::of(*model->match_linear({"layers.2.attn.v"}).at(0));
  const Tensor W = site->weight().base().clone(), b = site->bias()->base().clone();  // (384, 384), (384)
  Tensor x = at::randn({2, 3, 384});
  std::vector<std::unique_ptr<MethodInstance>> on;
  on.push_back(probe(*model, "pd", "param_delta", 0.01, {"layers.2.attn.v.weight"}));
  on.push_back(probe(*model, "wd", "weight_delta", 0.02, {"layers.2.attn.v"}));
  on.push_back(probe(*model, "si", "input_scale", 2.0, {"layers.2.attn.v"}));
  on.push_back(probe(*model, "so", "output_scale", 3.0, {"layers.2.attn.v"}));
  on.push_back(probe(*model, "br", "branch", 0.5, {"layers.2.attn.v"}));
  Tensor expect = (at::matmul(x * 2.0, (W + 0.01 + 0.02).t()) + b) * 3.0 + x * 0.5;
  CATCH_CHECK(test::max_abs_diff(site->forward(x), expect) < 1e-3);
  for (auto& p : on) p->detach(*model);
  CATCH_CHECK(test::max_abs_diff(site->forward(x), tessera::dense_linear(x, W, b)) == 0);  // nothing left behind
}

CATCH_TEST_CASE("sublayer, attention, embedding and layer interventions through plugins", "[plugins][probe][minilm]") {
  probe_id = GENERATE(as<std::string>{}, "probe", "probe-2.0");
  auto model = test::load_minilm();
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  at::NoGradGuard no_grad;
  const Tensor base = model->forward(ids, mask).hidden;
  auto detach = [&](std::unique_ptr<MethodInstance>& p) { p->detach(*model); };

  {  // sequential ×1 and gate ×1 leave the output as it was; parallel 0 too. Sublayer
     // interventions also switch the encoder from its unpadded path to the padded one, so
     // this compares the two paths as well.
    auto a = probe(*model, "s", "sequential", 1.0, {"attn", "mlp"});
    auto g = probe(*model, "g", "gate", 1.0, {"attn", "mlp"});
    auto p = probe(*model, "p", "parallel", 0.0, {"attn", "mlp"});
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base, mask) < 1e-5);
    detach(a), detach(g), detach(p);
    // A zero gate on every attention sublayer: each layer becomes LN(h) then its MLP.
    auto z = probe(*model, "z", "gate", 0.0, {"attn"});
    auto s2 = probe(*model, "s2", "sequential", 5.0, {"attn"});  // sequential runs before the gate, so it is cancelled too
    Tensor zeroed = model->forward(ids, mask).hidden;
    detach(z), detach(s2);
    auto zp = probe(*model, "zp", "parallel", -1.0, {"attn"});  // h + (-x)... differs from the gate
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, zeroed, mask) > 1e-3);
    detach(zp);
    auto z2 = probe(*model, "z2", "gate", 0.0, {"attn"});
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, zeroed, mask) == 0);
    detach(z2);
  }
  {  // A prefix whose keys score -1e9 through a score hook is invisible.
    auto pre = probe(*model, "pre", "prefix", 7.0, {"layers.*"}, 3);
    Tensor with_prefix = model->forward(ids, mask).hidden;
    CATCH_CHECK(test::max_abs_diff_tokens(with_prefix, base, mask) > 1e-3);
    auto hook = probe(*model, "hook", "score_hook", -1e9, {"layers.*"}, 3);
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base, mask) < 1e-4);
    detach(hook), detach(pre);
  }
  {  // Soft prompt: P tokens prepended, mask extended, pooling positions shifted.
    auto pr = probe(*model, "pr", "prompt", 0.1, {}, 4);
    Encoded e = model->forward(ids, mask);
    CATCH_CHECK(e.prompt_length == 4);
    CATCH_CHECK(e.hidden.size(1) == ids.size(1) + 4);
    CATCH_CHECK(e.mask.narrow(1, 0, 4).sum().item<std::int64_t>() == 4 * ids.size(0));
    CATCH_CHECK(at::equal(e.mask.narrow(1, 4, ids.size(1)), mask));
    detach(pr);
  }
  {  // Routers that keep no token: the encoder returns its embeddings; a tap sees each layer.
    auto tap = probe(*model, "tap", "tap", 0.0, {"layers.5"});
    Tensor out = model->forward(ids, mask).hidden;
    auto seen = tap->call("state", [](Method& m) { return m.state(); });
    CATCH_CHECK(test::max_abs_diff_tokens(seen.at("tapped"), out, mask) == 0);
    auto r = probe(*model, "r", "router", 0.0, {"layers.*"});
    Tensor routed = model->forward(ids, mask).hidden;
    auto keep_all = probe(*model, "r1", "router", 1.0, {"layers.*"});
    detach(r);
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base, mask) < 1e-5);
    detach(keep_all), detach(tap);
    // With every token skipping every layer, the output is the embedding block's output.
    auto P = [&](const std::string& n) {
      for (auto* p : model->parameter_sites())
        if (p->name() == n) return p->base();
      throw std::runtime_error("no parameter " + n);
    };
    Tensor emb = at::embedding(P("embed.word.weight"), ids) + P("embed.position.weight").narrow(0, 0, ids.size(1)) +
                 P("embed.token_type.weight")[0];
    emb = at::layer_norm(emb, {384}, P("embed.norm.weight"), P("embed.norm.bias"), 1e-12);
    CATCH_CHECK(test::max_abs_diff_tokens(routed, emb, mask) < 1e-5);
  }
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base, mask) == 0);
}
