// The site order for every intervention kind, exercised through the plugin boundary by
// the probe plugin (tests/plugins/probe.cpp) on the real encoder — built against this
// tree's SDK ("probe") and against the frozen SDK 2.0 … 2.6 headers ("probe-2.0",
// "probe-2.1", "probe-2.2", "probe-2.3", "probe-2.4", "probe-2.5", "probe-2.6", "probe-2.7"): all must give the same known math in this host.
#include "support.h"

#include "architectures/decoder.h"
#include "architectures/t5.h"

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

// MiniLM's embedding block by its formula: LN(word + position + token type 0), (B, T, H).
Tensor embeddings(ModelView& model, const Tensor& ids) {
  auto P = [&](const std::string& n) {
    for (auto* p : model.parameter_sites())
      if (p->name() == n) return p->base();
    throw std::runtime_error("no parameter " + n);
  };
  Tensor emb = at::embedding(P("embed.word.weight"), ids) + P("embed.position.weight").narrow(0, 0, ids.size(1)) +
               P("embed.token_type.weight")[0];
  return at::layer_norm(emb, {384}, P("embed.norm.weight"), P("embed.norm.bias"), 1e-12);
}

}  // namespace

CATCH_TEST_CASE("linear and parameter interventions from several plugins compose in the documented order", "[plugins][probe][minilm]") {
  probe_id = GENERATE(as<std::string>{}, "probe", "probe-2.0", "probe-2.1", "probe-2.2", "probe-2.3", "probe-2.4", "probe-2.5", "probe-2.6", "probe-2.7");
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
  probe_id = GENERATE(as<std::string>{}, "probe", "probe-2.0", "probe-2.1", "probe-2.2", "probe-2.3", "probe-2.4", "probe-2.5", "probe-2.6", "probe-2.7");
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
  {  // A prefix whose keys score -1e9 through a score hook is invisible. (On T5's encoder:
     // BERT numbers its tokens after a prefix, as transformers does past keys, so there an
     // invisible prefix still moves the positions.)
    auto t5 = T5Model::load(test::fixture("seq2seq/t5"), test::options());
    auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
    const Tensor t5_base = t5->encode(s2s["input_ids"], s2s["attention_mask"]).hidden;
    auto pre = probe(*t5, "pre", "prefix", 7.0, {"encoder.layers.*"}, 3);
    Tensor with_prefix = t5->encode(s2s["input_ids"], s2s["attention_mask"]).hidden;
    CATCH_CHECK(test::max_abs_diff_tokens(with_prefix, t5_base, s2s["attention_mask"]) > 1e-3);
    auto hook = probe(*t5, "hook", "score_hook", -1e9, {"encoder.layers.*"}, 3);
    CATCH_CHECK(test::max_abs_diff_tokens(t5->encode(s2s["input_ids"], s2s["attention_mask"]).hidden, t5_base, s2s["attention_mask"]) <
                1e-4 * std::max(1.0, t5_base.abs().max().item<double>()));
    hook->detach(*t5), pre->detach(*t5);
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
    CATCH_CHECK(test::max_abs_diff_tokens(routed, embeddings(*model, ids), mask) < 1e-5);
  }
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base, mask) == 0);
}

CATCH_TEST_CASE("SDK 2.1: weight transforms after the summed deltas, token-wise sublayer modules, the forward context, input prefixes, routing, the output site, the embedding tap", "[plugins][probe][minilm]") {
  probe_id = GENERATE(as<std::string>{}, "probe", "probe-2.1", "probe-2.2", "probe-2.3", "probe-2.4", "probe-2.5", "probe-2.6", "probe-2.7");  // the 2.1 kinds: the 2.0 build does not have them
  at::NoGradGuard no_grad;
  {  // A weight transform sees every weight delta, whichever was installed first.
    auto model = test::load_minilm();
    auto* site = &LinearSiteImpl::of(*model->match_linear({"layers.2.attn.v"}).at(0));
    const Tensor W = site->weight().base().clone(), b = site->bias()->base().clone();  // (384, 384), (384)
    const Tensor x = at::randn({2, 3, 384});
    auto t = probe(*model, "t", "weight_transform", 2.0, {"layers.2.attn.v"});
    auto d = probe(*model, "d", "weight_delta", 0.02, {"layers.2.attn.v"});
    CATCH_CHECK(test::max_abs_diff(site->forward(x), at::matmul(x, (2.0 * (W + 0.02)).t()) + b) < 1e-4);
    t->owner().set_scale(0.5);  // W' = V + ½(2V − V) = 1.5 V
    CATCH_CHECK(test::max_abs_diff(site->forward(x), at::matmul(x, (1.5 * (W + 0.02)).t()) + b) < 1e-4);
  }
  {  // Token-wise sublayer modules keep the unpadded path and equal the padded one.
    auto model = test::load_minilm();
    auto ref = test::read_tensors(test::fixture("reference.safetensors"));
    const auto &ids = ref["input_ids"], &mask = ref["attention_mask"];
    auto padded = probe(*model, "seq", "sequential", 0.7, {"mlp"});
    auto padded_par = probe(*model, "par", "parallel", 0.2, {"attn"});
    CATCH_CHECK_FALSE(model->token_wise_only());
    const Tensor expect = model->forward(ids, mask).hidden;
    padded.reset(), padded_par.reset();
    auto tw = probe(*model, "tw", "token_wise_sequential", 0.7, {"mlp"});
    auto tw_par = probe(*model, "twp", "token_wise_parallel", 0.2, {"attn"});
    CATCH_CHECK(model->token_wise_only());
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, expect, mask) < 1e-5);
  }
  if (probe_id == "probe") {  // SDK 2.3: a residual module sees r, which in BERT is what the block read
    auto model = test::load_minilm();
    auto ref = test::read_tensors(test::fixture("reference.safetensors"));
    const auto &ids = ref["input_ids"], &mask = ref["attention_mask"];
    auto par = probe(*model, "par", "parallel", 0.3, {"attn"});
    const Tensor expect = model->forward(ids, mask).hidden;
    par.reset();
    auto res = probe(*model, "res", "residual", 0.3, {"attn"});
    CATCH_CHECK(model->token_wise_only());
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, expect, mask) < 1e-5);
  }
  {  // The forward context: the mask of the layout closures see, each unpadded row's sample.
    auto model = test::load_minilm();
    auto ref = test::read_tensors(test::fixture("reference.safetensors"));
    const auto &ids = ref["input_ids"], &mask = ref["attention_mask"];
    auto c = probe(*model, "ctx", "context", 0.0, {"layers.0.attn.q"});
    model->forward(ids, mask);
    auto seen = c->call("state", [](Method& m) { return m.state(); });
    CATCH_CHECK(at::equal(seen.at("mask"), mask));
    CATCH_REQUIRE(seen.count("samples") == 1);  // a branch is token-wise: the encoder ran unpadded
    CATCH_CHECK(at::equal(seen.at("samples").cpu(), mask.cpu().nonzero().select(1, 0)));
    CATCH_CHECK(seen.at("task_is_b").numel() == 0);  // no tag columns outside a run
  }
  {  // An input prefix equals the same prefix without input, on every family; it sees (B, T, H).
    auto bert = test::load_minilm();
    auto ref = test::read_tensors(test::fixture("reference.safetensors"));
    auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
    auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
    auto llama = DecoderModel::load(test::fixture("decoders/llama"), test::options());
    auto t5 = T5Model::load(test::fixture("seq2seq/t5"), test::options());
    struct Case {
      const char* name;
      ModelView* model;
      std::function<Tensor()> out;
      Tensor ids, mask;  // the output's real positions
    };
    std::vector<Case> cases = {
        {"bert", bert.get(), [&] { return bert->forward(ref["input_ids"], ref["attention_mask"]).hidden; }, ref["input_ids"], ref["attention_mask"]},
        {"llama", llama.get(), [&] { return llama->forward(dec["input_ids"], dec["attention_mask"]); }, dec["input_ids"], dec["attention_mask"]},
        {"t5", t5.get(), [&] { return t5->decode(s2s["t5.decoder_input_ids"], t5->encode(s2s["input_ids"], s2s["attention_mask"])); }, s2s["input_ids"],
         at::ones_like(s2s["t5.decoder_input_ids"])},
    };
    for (auto& c : cases) {
      CATCH_INFO(c.name);
      const Tensor bare = c.out();
      Tensor with_static;
      {
        auto p = probe(*c.model, "static", "prefix", 7.0, {"*layers.*.attn"}, 3);
        with_static = c.out();
      }
      auto p = probe(*c.model, "input", "input_prefix", 7.0, {"*layers.*.attn"}, 3);
      const Tensor with_input = c.out();
      CATCH_CHECK(test::max_abs_diff_tokens(with_input, bare, c.mask) > 1e-3);  // the prefix is seen
      CATCH_CHECK(test::max_abs_diff_tokens(with_input, with_static, c.mask) < 1e-4 * std::max(1.0, with_static.abs().max().item<double>()));
      const Tensor shape = p->call("state", [](Method& m) { return m.state(); }).at("input_shape");
      CATCH_CHECK(shape.size(0) == 3);
      CATCH_CHECK(shape[0].item<std::int64_t>() == c.ids.size(0));
    }
    // Grouped-query attention: prefixes per key/value head, hooks see every query head.
    auto* site = llama->attention_sites().at(0);
    CATCH_CHECK(site->num_heads() == llama->config().num_kv_heads);
    CATCH_CHECK(site->num_query_heads() == llama->config().num_heads);
    CATCH_CHECK(site->num_query_heads() > site->num_heads());  // the fixture is grouped-query
    auto hook = probe(*llama, "hook", "score_hook", 0.0, {"layers.0.attn"});
    llama->forward(dec["input_ids"], dec["attention_mask"]);
    CATCH_CHECK(hook->call("state", [](Method& m) { return m.state(); }).at("score_shape")[1].item<std::int64_t>() == site->num_query_heads());
  }
  {  // Routing: tokens every layer keeps run the layers among themselves, the others skip them.
     // Keeping each row's first K tokens everywhere gives those tokens the states of the
     // input cut to K tokens (encoders: BERT gathers them, T5 masks), the rest their embeddings.
    auto bert = test::load_minilm();
    auto ref = test::read_tensors(test::fixture("reference.safetensors"));
    const Tensor ids = ref["input_ids"], mask = ref["attention_mask"];
    const std::int64_t K = 5;
    const Tensor cut = bert->forward(ids.narrow(1, 0, K), mask.narrow(1, 0, K)).hidden;  // (B, K, H)
    auto r = probe(*bert, "route", "router_prefix", 0.0, {"layers.*"}, K);
    const Tensor routed = bert->forward(ids, mask).hidden;
    CATCH_CHECK(test::max_abs_diff_tokens(routed.narrow(1, 0, K), cut, mask.narrow(1, 0, K)) < 1e-4);
    CATCH_CHECK(test::max_abs_diff_tokens(routed.narrow(1, K, ids.size(1) - K), embeddings(*bert, ids).narrow(1, K, ids.size(1) - K),
                                          mask.narrow(1, K, ids.size(1) - K)) < 1e-5);
    r.reset();
    auto t5 = T5Model::load(test::fixture("seq2seq/t5"), test::options());
    auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
    const Tensor src = s2s["input_ids"], src_mask = s2s["attention_mask"];
    const Tensor t5_cut = t5->encode(src.narrow(1, 0, K), src_mask.narrow(1, 0, K)).hidden;
    auto rt = probe(*t5, "route", "router_prefix", 0.0, {"encoder.layers.*"}, K);
    CATCH_CHECK(test::max_abs_diff_tokens(t5->encode(src, src_mask).hidden.narrow(1, 0, K), t5_cut, src_mask.narrow(1, 0, K)) <
                1e-4 * std::max(1.0, t5_cut.abs().max().item<double>()));
  }
  {  // BERT (the real MiniLM): padded batches, the encoder's unpadded path stays on
    auto model = test::load_minilm();
    auto ref = test::read_tensors(test::fixture("reference.safetensors"));
    const auto &ids = ref["input_ids"], &mask = ref["attention_mask"];
    const Tensor base = model->forward(ids, mask).hidden;
    auto out = probe(*model, "out", "output", 3.0, {});
    CATCH_CHECK(test::max_abs_diff(model->forward(ids, mask).hidden, base * 3.0) == 0);
    out->owner().set_scale(0.5);  // h + ½(3h − h) = 2h
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base * 2.0, mask) < 1e-5);
    out.reset();
    auto tap = probe(*model, "tap", "embed_tap", 0.0, {});
    model->forward(ids, mask);
    const Tensor seen = tap->call("state", [](Method& m) { return m.state(); }).at("tapped");
    CATCH_CHECK(test::max_abs_diff_tokens(seen, embeddings(*model, ids), mask) < 1e-5);
    if (probe_id == "probe") {  // an embedding transform (SDK 2.7, this tree's probe only): layer 0
                                // reads x0 · 3, and the taps see what it reads; under the host's
                                // scale ½, x0 + ½(3x0 − x0) = 2x0
      auto tr = probe(*model, "tr", "embed_transform", 3.0, {});
      model->forward(ids, mask);
      Tensor now = tap->call("state", [](Method& m) { return m.state(); }).at("tapped");
      CATCH_CHECK(test::max_abs_diff_tokens(now, embeddings(*model, ids) * 3.0, mask) < 1e-5);
      tr->owner().set_scale(0.5);
      model->forward(ids, mask);
      now = tap->call("state", [](Method& m) { return m.state(); }).at("tapped");
      CATCH_CHECK(test::max_abs_diff_tokens(now, embeddings(*model, ids) * 2.0, mask) < 1e-5);
      CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base, mask) > 1e-2);
    }
    tap.reset();
    CATCH_CHECK(test::max_abs_diff(model->forward(ids, mask).hidden, base) == 0);
  }
  for (const char* name : {"gpt2", "llama"}) {  // decoders: after the final norm
    auto model = DecoderModel::load(test::fixture(std::string("decoders/") + name), test::options());
    auto& ref = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
    const Tensor base = model->forward(ref["input_ids"], ref["attention_mask"]);
    auto out = probe(*model, "out", "output", -2.0, {});
    CATCH_CHECK(test::max_abs_diff(model->forward(ref["input_ids"], ref["attention_mask"]), base * -2.0) == 0);
    auto tap = probe(*model, "tap", "embed_tap", 0.0, {});
    model->forward(ref["input_ids"], ref["attention_mask"]);
    const Tensor seen = tap->call("state", [](Method& m) { return m.state(); }).at("tapped");
    CATCH_CHECK(seen.sizes() == at::IntArrayRef({ref["input_ids"].size(0), ref["input_ids"].size(1), model->info().hidden_size}));
  }
  {  // T5: the decoder's final hidden states
    auto model = T5Model::load(test::fixture("seq2seq/t5"), test::options());
    auto& ref = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
    const Encoded enc = model->encode(ref["input_ids"], ref["attention_mask"]);
    const Tensor base = model->decode(ref["t5.decoder_input_ids"], enc);
    auto out = probe(*model, "out", "output", 0.5, {});
    CATCH_CHECK(test::max_abs_diff(model->decode(ref["t5.decoder_input_ids"], enc), base * 0.5) == 0);
    CATCH_CHECK(test::max_abs_diff(model->encode(ref["input_ids"], ref["attention_mask"]).hidden, enc.hidden) == 0);  // not the encoder's
  }
}
