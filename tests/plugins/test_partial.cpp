// Partial methods (plugins/partial): LN-tuning against peft's LN_TUNING — its folders load
// and give peft's outputs on MiniLM, GPT-2, LLaMA and T5, merged and unmerged, ours load in
// PeftModel.from_pretrained — and BitFit against a plain PyTorch rendering of the paper
// (tests/fixtures/make_partial.py): the same gradients, the same biases and hidden states
// after three SGD steps; the base bit for bit unchanged through all of it.
#include "support.h"

#include "architectures/decoder.h"
#include "architectures/t5.h"
#include "formats/safetensors.h"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace tessera;

namespace {

NamedTensors& reference() { return test::cached_tensors(test::fixture("partial/reference.safetensors")); }

std::map<std::string, Tensor> snapshot(ModelView& model) {
  std::map<std::string, Tensor> out;
  for (auto* p : model.parameter_sites()) out[p->name()] = p->base().clone();
  return out;
}

bool unchanged(ModelView& model, const std::map<std::string, Tensor>& before) {
  for (auto* p : model.parameter_sites())
    if (!at::equal(p->base(), before.at(p->name()))) return false;
  return true;
}

// After merge and unmerge: (b + δ) − δ, the base back to rounding.
double restored_within(ModelView& model, const std::map<std::string, Tensor>& before) {
  double worst = 0;
  for (auto* p : model.parameter_sites())
    worst = std::max(worst, (p->base() - before.at(p->name())).abs().max().item<double>() / std::max(1.0, before.at(p->name()).abs().max().item<double>()));
  return worst;
}

}  // namespace

CATCH_TEST_CASE("LN-tuning equals peft's LN_TUNING on MiniLM, GPT-2, LLaMA and T5, merged and unmerged, the base untouched", "[plugins][partial][parity]") {
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
  for (const std::string name : {"minilm", "gpt2", "llama", "t5"}) {
    CATCH_INFO(name);
    std::unique_ptr<SiteModel> model;
    std::function<Tensor()> out;
    Tensor mask;
    if (name == "minilm") {
      auto m = test::load_minilm();
      auto* b = m.get();
      out = [b, &enc] { return b->forward(enc["input_ids"], enc["attention_mask"]).hidden; }, mask = enc["attention_mask"];
      model = std::move(m);
    } else if (name == "t5") {
      auto m = T5Model::load(test::fixture("seq2seq/t5"), test::options());
      auto* t = m.get();
      out = [t, &s2s] { return t->logits(t->decode(s2s["t5.decoder_input_ids"], t->encode(s2s["input_ids"], s2s["attention_mask"]))); };
      model = std::move(m);
    } else {
      auto m = DecoderModel::load(test::fixture("decoders/" + name), test::options());
      auto* d = m.get();
      out = [d, &dec] { return d->logits(d->forward(dec["input_ids"], dec["attention_mask"])); }, mask = dec["attention_mask"];
      model = std::move(m);
    }
    test::perturb_if_asked(*model);
    const auto before = snapshot(*model);
    auto ln = test::attach_peft_adapter(test::fixture("partial/" + name + "_ln"), *model);
    CATCH_CHECK(ln->plugin_id() == "ln_tuning");
    at::NoGradGuard no_grad;
    const Tensor tuned = out();
    TESSERA_CHECK_PARITY(test::parity(tuned, reference(), name + ".ln", mask));
    CATCH_CHECK(unchanged(*model, before));  // a delta on the parameter sites, not a write
    ln->call("merge", [](Method& m) { m.merge(); });
    CATCH_CHECK(test::max_abs_diff_tokens(out(), tuned, mask.defined() ? mask : at::ones(tuned.sizes().slice(0, 2), at::kLong)) <
                1e-5 * std::max(1.0, tuned.abs().max().item<double>()));
    ln->call("unmerge", [](Method& m) { m.unmerge(); });
    CATCH_CHECK(restored_within(*model, before) < 1e-6);  // the fold taken back, to rounding
    ln->detach(*model);
  }
}

CATCH_TEST_CASE("LN-tuning saves peft's folder: PeftModel.from_pretrained computes what we compute", "[plugins][partial][parity]") {
  auto model = DecoderModel::load(test::fixture("decoders/llama"), test::options());
  test::perturb_if_asked(*model);
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  auto ln = test::registry().create("ln_tuning", "ln");
  ln->attach(*model, {}, apply_schema(test::registry().find("ln_tuning")->params, {}));
  {
    at::NoGradGuard no_grad;
    at::manual_seed(11);
    for (auto& [k, t] : ln->call("trainable", [](Method& m) { return m.trainable(); })) t.add_(at::randn(t.sizes(), t.options()) * 0.1);
  }
  CATCH_CHECK(ln->call("state", [](Method& m) { return m.state(); }).size() == 2 * 2 + 1);  // input and post-attention norms of 2 layers, the final norm
  const auto theirs = test::peft_outputs(*ln, "causal", test::fixture("decoders/llama"), test::fixture("decoders/reference.safetensors"));
  at::NoGradGuard no_grad;
  const Tensor ours = model->logits(model->forward(dec["input_ids"], dec["attention_mask"]));
  TESSERA_CHECK_PARITY(test::parity(ours, theirs, "out", dec["attention_mask"]));
}

CATCH_TEST_CASE("BitFit equals the paper in plain PyTorch: gradients, and biases and outputs after three SGD steps", "[plugins][partial][minilm][parity]") {
  auto model = test::load_minilm();
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc["input_ids"], mask = enc["attention_mask"];
  const auto before = snapshot(*model);
  auto bitfit = test::registry().create("bitfit", "bitfit");
  bitfit->attach(*model, {}, apply_schema(test::registry().find("bitfit")->params, {{"subset", std::string("paper")}}));
  auto deltas = bitfit->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_REQUIRE(deltas.size() == 6 * 2);  // the query and intermediate biases of 6 layers
  const Tensor direction = reference()["bitfit.direction"];
  auto loss = [&] {
    const Tensor h = model->forward(ids, mask).hidden;
    return (h * direction * mask.unsqueeze(-1)).sum() / mask.sum();
  };
  // The file key of each delta: the HF name of its bias.
  auto hf_name = [&](const std::string& trainable_key) {
    const std::string site = trainable_key.substr(0, trainable_key.size() - std::string(".bitfit_delta").size());
    for (auto* p : model->parameter_sites())
      if (p->name() == site) return p->hf_name();
    throw std::runtime_error("no site " + site);
  };
  loss().backward();
  for (auto& [k, d] : deltas) {
    CATCH_INFO(k);
    const Tensor g = reference()["bitfit.grad." + hf_name(k)];
    CATCH_CHECK(test::max_abs_diff(d.grad(), g) <= 1e-4 * std::max(1e-3, g.abs().max().item<double>()));
  }
  for (int step = 0; step < 3; ++step) {
    for (auto& [k, d] : deltas) d.mutable_grad().reset();
    loss().backward();
    at::NoGradGuard no_grad;
    for (auto& [k, d] : deltas) d.sub_(0.5 * d.grad());
  }
  at::NoGradGuard no_grad;
  const auto state = bitfit->call("state", [](Method& m) { return m.state(); });  // the tuned biases' values
  for (auto& [k, d] : deltas) {
    const Tensor after = reference()["bitfit.after." + hf_name(k)];
    CATCH_CHECK(test::max_abs_diff(state.at("base_model.model." + hf_name(k)), after) <= 1e-4 * std::max(1.0, after.abs().max().item<double>()));
  }
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, reference(), "bitfit.hidden_after", mask));
  CATCH_CHECK(unchanged(*model, before));
  // The state loads into a fresh instance on a fresh model and gives the same outputs.
  auto model2 = test::load_minilm();
  auto again = test::registry().create("bitfit", "bitfit");
  again->attach(*model2, {}, apply_schema(test::registry().find("bitfit")->params, {{"subset", std::string("paper")}}));
  again->call("load_state", [&](Method& m) { m.load_state(state); });
  CATCH_CHECK(test::max_abs_diff_tokens(model2->forward(ids, mask).hidden, model->forward(ids, mask).hidden, mask) < 1e-5);
}

CATCH_TEST_CASE("Full fine-tuning equals every parameter trained in plain PyTorch: outputs after three SGD steps", "[plugins][partial][minilm][parity]") {
  auto model = test::load_minilm();
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc["input_ids"], mask = enc["attention_mask"];
  const auto before = snapshot(*model);
  auto full = test::registry().create("full", "full");
  full->attach(*model, {}, apply_schema(test::registry().find("full")->params, {}));
  auto deltas = full->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_CHECK(static_cast<std::int64_t>(deltas.size()) == reference()["full.tensors"].item<std::int64_t>());  // every tensor transformers trains
  const Tensor direction = reference()["bitfit.direction"];
  for (int step = 0; step < 3; ++step) {
    for (auto& [k, d] : deltas) d.mutable_grad().reset();
    const Tensor h = model->forward(ids, mask).hidden;
    ((h * direction * mask.unsqueeze(-1)).sum() / mask.sum()).backward();
    at::NoGradGuard no_grad;
    for (auto& [k, d] : deltas) d.sub_(0.05 * d.grad());
  }
  at::NoGradGuard no_grad;
  const auto state = full->call("state", [](Method& m) { return m.state(); });
  const Tensor word = state.at("base_model.model.embeddings.word_embeddings.weight").slice(0, 0, 200);
  CATCH_CHECK(test::max_abs_diff(word, reference()["full.word_after"]) <= 1e-4);
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, reference(), "full.hidden_after", mask));
  CATCH_CHECK(unchanged(*model, before));  // the base itself never written
  // Without the embedding tables: three fewer tensors, and --disable-like removal restores the base.
  auto model2 = test::load_minilm();
  auto frozen_tables = test::registry().create("full", "f");
  frozen_tables->attach(*model2, {}, apply_schema(test::registry().find("full")->params, {{"embeddings", false}}));
  CATCH_CHECK(frozen_tables->call("trainable", [](Method& m) { return m.trainable(); }).size() + 3 == deltas.size());
}

CATCH_TEST_CASE("BitFit takes every bias by default, refuses a model without biases, and partial files are checked by name", "[plugins][partial]") {
  auto model = test::load_minilm();
  auto bitfit = test::registry().create("bitfit", "b");
  bitfit->attach(*model, {}, apply_schema(test::registry().find("bitfit")->params, {}));
  // Per layer q, k, v, o, up, down and two LayerNorms; the embedding LayerNorm.
  CATCH_CHECK(bitfit->call("trainable", [](Method& m) { return m.trainable(); }).size() == 6 * 8 + 1);
  auto state = bitfit->call("state", [](Method& m) { return m.state(); });
  state["base_model.model.encoder.layer.9.attention.self.query.bias"] = at::zeros({384});
  CATCH_CHECK_THROWS_WITH(bitfit->call("load_state", [&](Method& m) { m.load_state(state); }),
                          Catch::Contains("'base_model.model.encoder.layer.9.attention.self.query.bias' is not one of this BitFit's biases"));
  bitfit->detach(*model);
  auto llama = DecoderModel::load(test::fixture("decoders/llama"), test::options());
  auto none = test::registry().create("bitfit", "b");
  CATCH_CHECK_THROWS_WITH(none->attach(*llama, {}, apply_schema(test::registry().find("bitfit")->params, {})),
                          Catch::Contains("this llama model has none (its linear layers and norms are bias-free)"));
  auto ln = test::registry().create("ln_tuning", "ln");
  CATCH_CHECK_THROWS_WITH(ln->attach(*llama, {"attn.q"}, apply_schema(test::registry().find("ln_tuning")->params, {})),
                          Catch::Contains("no norm of this llama model matches the targets"));
}

namespace {

// The tiny BERT's fixed per-example loss of make_partial.py: Σ h_i · d_i over real tokens.
Tensor fish_example_loss(BertModel& m, const Tensor& ids, const Tensor& mask, std::int64_t i) {
  const Tensor h = m.forward(ids.narrow(0, i, 1), mask.narrow(0, i, 1)).hidden[0];  // (T, H)
  return (h * reference()["fish.direction"][i] * mask[i].unsqueeze(-1)).sum();
}

}  // namespace

CATCH_TEST_CASE("FISH mask equals the authors' algorithm in plain PyTorch: per-example Fisher, global top-k, masked steps", "[plugins][partial][parity]") {
  auto model = BertModel::load(test::fixture("tiny_bert_mlm"), test::options());
  test::perturb_if_asked(*model);
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc["roberta.input_ids"], mask = enc["bert_mlm.attention_mask"];
  const auto before = snapshot(*model);
  auto fish = test::registry().create("fish_mask", "fish");
  // The encoder's tensors, as the reference's BertModel has them (not the checkpoint's MLM head).
  fish->attach(*model, {"re:bert\\..*"}, apply_schema(test::registry().find("fish_mask")->params, {{"keep_ratio", 0.01}}));
  Calibration c;
  c.examples = ids.size(0);
  c.example_loss = [&](std::int64_t i) { return fish_example_loss(*model, ids, mask, i); };
  fish->call("prepare", [&](Method& m) { m.prepare(c); });
  CATCH_CHECK(unchanged(*model, before));
  // Our mask: as many entries as the reference's, each at or above its Fisher threshold.
  const auto state = fish->call("state", [](Method& m) { return m.state(); });
  const double threshold = reference()["fish.threshold"].item<double>();
  std::int64_t ours = 0, theirs = 0;
  for (const auto& [k, t] : reference())
    if (k.rfind("fish.indices.", 0) == 0) theirs += t.numel();
  for (const auto& [k, t] : state) {
    if (k.size() < 13 || k.compare(k.size() - 13, 13, ".fish_indices") != 0) continue;
    ours += t.numel();
    const Tensor f = reference()["fish.fisher." + k.substr(0, k.size() - 13)].reshape({-1}).to(at::kCPU);
    CATCH_INFO(k);
    CATCH_CHECK(f.index_select(0, t.to(at::kCPU)).min().item<double>() >= threshold * (1 - 1e-3));
  }
  CATCH_CHECK(ours == theirs);
  // Three masked SGD steps from the reference's mask: the same hidden states.
  tessera::NamedTensors given;
  for (const auto& [k, t] : reference())
    if (k.rfind("fish.indices.", 0) == 0) {
      const std::string name = k.substr(13);
      if (t.numel() == 0) continue;
      given[name + ".fish_indices"] = t;
      given[name + ".fish_delta"] = at::zeros({t.numel()});
    }
  fish->call("load_state", [&](Method& m) { m.load_state(given); });
  auto deltas = fish->call("trainable", [](Method& m) { return m.trainable(); });
  for (int step = 0; step < 3; ++step) {
    for (auto& [k, d] : deltas) d.mutable_grad().reset();
    Tensor loss = fish_example_loss(*model, ids, mask, 0);
    for (std::int64_t i = 1; i < ids.size(0); ++i) loss = loss + fish_example_loss(*model, ids, mask, i);
    loss.backward();
    at::NoGradGuard no_grad;
    for (auto& [k, d] : deltas)
      if (d.grad().defined()) d.sub_(0.05 * d.grad());
  }
  at::NoGradGuard no_grad;
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, reference(), "fish.hidden_after", mask));
  CATCH_CHECK(unchanged(*model, before));
  // Sparse files are checked by name: an index outside its tensor, or repeated.
  auto bad = given;
  const auto first = bad.begin()->first;
  const std::string name = first.substr(0, first.rfind('.'));
  bad[name + ".fish_indices"] = at::tensor({0, 1'000'000}, at::kLong), bad[name + ".fish_delta"] = at::zeros({2});
  CATCH_CHECK_THROWS_WITH(fish->call("load_state", [&](Method& m) { m.load_state(bad); }), Catch::Contains("falls outside its"));
  bad[name + ".fish_indices"] = at::tensor({3, 3}, at::kLong);
  CATCH_CHECK_THROWS_WITH(fish->call("load_state", [&](Method& m) { m.load_state(bad); }), Catch::Contains("indices repeat"));
  CATCH_CHECK_THROWS_AS(apply_schema(test::registry().find("fish_mask")->params, {{"keep_ratio", 1.5}}), std::exception);
  CATCH_CHECK_THROWS_WITH(fish->call("prepare", [&](Method& m) { m.prepare(Calibration{}); }), Catch::Contains("the host offers none"));
}

CATCH_TEST_CASE("FISH through a tied embedding: GPT-2's head and embedding reads are summed before squaring, as in PyTorch", "[plugins][partial]") {
  auto model = DecoderModel::load(test::fixture("decoders/gpt2"), test::options());
  test::perturb_if_asked(*model);
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  const Tensor ids = dec["input_ids"], mask = dec["attention_mask"];
  auto fish = test::registry().create("fish_mask", "fish");
  fish->attach(*model, {}, apply_schema(test::registry().find("fish_mask")->params, {{"keep_ratio", 0.01}}));
  Calibration c;
  c.examples = ids.size(0);
  c.example_loss = [&](std::int64_t i) {
    const Tensor logits = model->logits(model->forward(ids.narrow(0, i, 1), mask.narrow(0, i, 1)))[0];  // (T, V)
    return (logits * reference()["fish_gpt2.direction"][i] * mask[i].unsqueeze(-1)).sum();
  };
  fish->call("prepare", [&](Method& m) { m.prepare(c); });
  const auto state = fish->call("state", [](Method& m) { return m.state(); });
  std::int64_t kept = 0;
  for (const auto& [k, t] : state)
    if (k.size() > 13 && k.compare(k.size() - 13, 13, ".fish_indices") == 0) kept += t.numel();
  CATCH_CHECK(kept == reference()["fish_gpt2.count"].item<std::int64_t>());
  // The word embedding is read twice (embedding and tied head): the entries chosen there carry
  // at least the reference's threshold of the summed gradient's square.
  Tensor idx;
  for (const auto& [k, t] : state)
    if (k.size() >= 23 && k.compare(k.size() - 23, 23, "wte.weight.fish_indices") == 0) idx = t.to(at::kCPU);
  CATCH_REQUIRE(idx.numel() > 0);
  const Tensor f = reference()["fish_gpt2.fisher.wte"].reshape({-1}).to(at::kCPU).index_select(0, idx);
  CATCH_CHECK(f.min().item<double>() >= reference()["fish_gpt2.threshold"].item<double>() * (1 - 1e-3));
}

namespace {

// Σ over `rows` of the per-example loss above: one calibration batch.
Tensor rows_loss(BertModel& m, const Tensor& ids, const Tensor& mask, std::vector<std::int64_t> rows) {
  Tensor loss;
  for (const auto i : rows) loss = loss.defined() ? loss + fish_example_loss(m, ids, mask, i) : fish_example_loss(m, ids, mask, i);
  return loss;
}

// The largest |ours − theirs| over a tensor, relative to the reference's largest entry or to
// `floor` when that is smaller (a key bias's gradient is 0 but for rounding: softmax ignores it).
double relative_diff(const Tensor& ours, const Tensor& theirs, double floor = 1e-5) {
  const Tensor a = ours.detach().to(at::kCPU, at::kDouble), b = theirs.to(at::kCPU, at::kDouble);
  return (a - b).abs().max().item<double>() / std::max(floor, b.abs().max().item<double>());
}

}  // namespace

CATCH_TEST_CASE("Child-Tuning task-driven equals the authors' calculate_fisher: clipped batch gradients squared, numpy's percentile, F ≥ it", "[plugins][partial]") {
  auto model = BertModel::load(test::fixture("tiny_bert_mlm"), test::options());
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc["roberta.input_ids"], mask = enc["bert_mlm.attention_mask"];
  const auto before = snapshot(*model);
  auto ct = test::registry().create("child_tuning", "child");
  ct->attach(*model, {}, apply_schema(test::registry().find("child_tuning")->params, {{"reserve_p", 0.3}}));
  const std::vector<std::vector<std::int64_t>> batches = {{0, 1}, {2}};
  const Calibration c{2, [&](std::int64_t b) { return rows_loss(*model, ids, mask, batches.at(static_cast<std::size_t>(b))); }};
  ct->call("prepare", [&](Method& m) { m.prepare(c); });
  CATCH_CHECK(unchanged(*model, before));
  // The child network: what the reference keeps, up to entries within rounding of its threshold.
  const auto state = ct->call("state", [](Method& m) { return m.state(); });
  const double threshold = reference()["child_d.threshold"].item<double>();
  std::int64_t ours = 0, theirs = 0, near = 0;
  for (const auto& [k, t] : reference())
    if (k.rfind("child_d.indices.", 0) == 0) theirs += t.numel();
  for (const auto& [k, t] : reference())
    if (k.rfind("child_d.fisher.", 0) == 0) near += ((t - threshold).abs() <= 1e-3 * threshold).sum().item<std::int64_t>();
  for (const auto& [k, t] : state) {
    if (k.size() < 14 || k.compare(k.size() - 14, 14, ".child_indices") != 0) continue;
    ours += t.numel();
    const std::string name = k.substr(0, k.size() - 14);
    CATCH_INFO(k);
    CATCH_CHECK(name.find(".layer.") != std::string::npos);  // the transformer layers only, as the authors' 'layer' filter
    const Tensor f = reference()["child_d.fisher." + name].reshape({-1}).to(at::kCPU);
    CATCH_CHECK(f.index_select(0, t.to(at::kCPU)).min().item<double>() >= threshold * (1 - 1e-3));
  }
  CATCH_CHECK(theirs > 0);
  CATCH_CHECK(std::abs(ours - theirs) <= near);
  // And the other way: every entry clearly above the reference's threshold is ours.
  for (const auto& [k, f] : reference()) {
    if (k.rfind("child_d.fisher.", 0) != 0) continue;
    const std::string name = k.substr(15);
    const Tensor strong = (f.reshape({-1}) > threshold * (1 + 1e-3)).nonzero().reshape({-1});
    if (strong.numel() == 0) continue;
    CATCH_INFO(name);
    const auto it = state.find(name + ".child_indices");
    CATCH_REQUIRE(it != state.end());
    CATCH_CHECK(at::isin(strong, it->second.to(strong.device())).all().item<bool>());
  }
  // Trained entries are the child network alone: a sparse delta, k numbers.
  std::int64_t trained = 0;
  for (const auto& [k, t] : ct->call("trainable", [](Method& m) { return m.trainable(); })) trained += t.numel();
  CATCH_CHECK(trained == ours);
  CATCH_CHECK_THROWS_WITH(ct->call("prepare", [&](Method& m) { m.prepare(Calibration{}); }), Catch::Contains("the host offers none"));
  CATCH_CHECK_THROWS_AS(apply_schema(test::registry().find("child_tuning")->params, {{"reserve_p", 0.0}}), std::exception);
  for (const char* plugin : {"child_tuning", "diff_pruning"}) {
    auto none = test::registry().create(plugin, "none");
    CATCH_CHECK_THROWS_WITH(none->attach(*model, {"no.such.tensor"}, apply_schema(test::registry().find(plugin)->params, {})),
                            Catch::Contains("no parameter of this bert model matches the targets"));
  }
}

CATCH_TEST_CASE("Child-Tuning task-free equals the authors' optimizer in plain PyTorch: Bernoulli(p)/p gradient masks from one seed, three steps", "[plugins][partial][parity]") {
  if (!test::device().is_cpu()) {  // the reference's noise is torch's CPU generator's
    CATCH_WARN("skipped on " << test::device().str() << ": the reference draws its masks from the CPU generator");
    return;
  }
  auto model = BertModel::load(test::fixture("tiny_bert_mlm"), test::options());
  test::perturb_if_asked(*model);
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc["roberta.input_ids"], mask = enc["bert_mlm.attention_mask"];
  const auto before = snapshot(*model);
  auto ct = test::registry().create("child_tuning", "child");
  ct->attach(*model, {}, apply_schema(test::registry().find("child_tuning")->params, {{"mode", std::string("task_free")}, {"reserve_p", 0.4}, {"seed", std::int64_t{5}}}));
  auto deltas = ct->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_CHECK(deltas.size() == 2 * 16);  // every tensor of the two layers, dense
  for (int step = 0; step < 3; ++step) {
    for (auto& [k, d] : deltas) d.mutable_grad().reset();
    rows_loss(*model, ids, mask, {0, 1, 2}).backward();
    ct->call("after_backward", [](Method& m) { m.after_backward(); });
    at::NoGradGuard no_grad;
    for (auto& [k, d] : deltas) d.sub_(0.05 * d.grad());
  }
  at::NoGradGuard no_grad;
  const Tensor adapted = model->forward(ids, mask).hidden;
  TESSERA_CHECK_PARITY(test::parity(adapted, reference(), "child_f.hidden_after", mask));
  CATCH_CHECK(unchanged(*model, before));
  // Saved as the tuned tensors' full values under their HF names; merged, the same outputs.
  const auto state = ct->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(state.count("bert.encoder.layer.1.output.dense.weight") == 1);
  ct->call("merge", [](Method& m) { m.merge(); });
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, adapted, mask) < 1e-5);
  ct->call("unmerge", [](Method& m) { m.unmerge(); });
}

CATCH_TEST_CASE("Diff pruning equals the paper in plain PyTorch: hard-concrete gates, the L0 term, three steps, then the magnitude projection", "[plugins][partial][parity]") {
  if (!test::device().is_cpu()) {  // the reference's noise is torch's CPU generator's
    CATCH_WARN("skipped on " << test::device().str() << ": the reference draws its masks from the CPU generator");
    return;
  }
  auto model = BertModel::load(test::fixture("partial/tiny_bert_nodrop"), test::options());  // the gates' noise is the only one
  test::perturb_if_asked(*model);
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc["roberta.input_ids"], mask = enc["bert_mlm.attention_mask"];
  const auto before = snapshot(*model);
  auto dp = test::registry().create("diff_pruning", "diff");
  dp->attach(*model, {},
             apply_schema(test::registry().find("diff_pruning")->params,
                          {{"target_ratio", 0.01}, {"alpha_init", 0.5}, {"l0_lambda", 1e-3}, {"seed", std::int64_t{11}}, {"prune_at", 0.5}}));
  auto trainable = dp->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_CHECK(trainable.size() == 3 * 2 * 16);  // w, α and the group's α per tensor of the two layers
  for (std::int64_t step = 0; step < 3; ++step) {
    dp->call("on_step", [&](Method& m) { m.on_step(StepInfo{step, 100, 0.05}); });
    model->train(true);
    Tensor loss = rows_loss(*model, ids, mask, {0, 1, 2}) + dp->call("extra_loss", [](Method& m) { return m.extra_loss(); });
    for (auto& [k, t] : trainable) t.mutable_grad().reset();
    loss.backward();
    model->train(false);
    at::NoGradGuard no_grad;
    for (auto& [k, t] : trainable) t.sub_(0.05 * t.grad());
  }
  // w, α and the group α after the steps, by HF name; the evaluation gates' outputs.
  const auto state = dp->call("state", [](Method& m) { return m.state(); });
  for (const char* part : {"w", "alpha", "group_alpha"})
    for (const auto& [k, t] : state) {
      const std::string suffix = std::string(".diff_") + part;
      if (k.size() <= suffix.size() || k.compare(k.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
      CATCH_INFO(k);
      CATCH_CHECK(relative_diff(t, reference()["diff." + std::string(part) + ".bert." + k.substr(0, k.size() - suffix.size())]) < 1e-4);
    }
  {
    at::NoGradGuard no_grad;
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, reference(), "diff.hidden_after", mask));
  }
  CATCH_CHECK(unchanged(*model, before));
  // The projection: as many entries as the reference keeps, each of its |δ| at or above the
  // reference's cut, holding the reference's δ there; from then on those k values alone train.
  dp->call("on_step", [](Method& m) { m.on_step(StepInfo{50, 100, 0.05}); });
  const auto projected = dp->call("state", [](Method& m) { return m.state(); });
  const double cut = reference()["diff.projected_threshold"].item<double>();
  std::int64_t kept = 0;
  for (const auto& [k, t] : projected) {
    if (k.size() <= 13 || k.compare(k.size() - 13, 13, ".diff_indices") != 0) continue;
    kept += t.numel();
    const std::string name = k.substr(0, k.size() - 13);
    CATCH_INFO(k);
    const Tensor theirs = reference()["diff.eval_delta.bert." + name].reshape({-1}).index_select(0, t.to(at::kCPU));
    CATCH_CHECK(theirs.abs().min().item<double>() >= cut * (1 - 1e-3));
    CATCH_CHECK(relative_diff(projected.at(name + ".diff_delta"), theirs) < 1e-3);
  }
  CATCH_CHECK(kept == reference()["diff.projected_count"].item<std::int64_t>());
  std::int64_t trained = 0;
  for (const auto& [k, t] : dp->call("trainable", [](Method& m) { return m.trainable(); })) trained += t.numel();
  CATCH_CHECK(trained == kept);
  CATCH_CHECK_FALSE(dp->call("extra_loss", [](Method& m) { return m.extra_loss(); }).defined());
  // A fresh instance loads the projected file; a fresh one refuses a foreign tensor by name.
  auto again = test::registry().create("diff_pruning", "diff");
  again->attach(*model, {}, apply_schema(test::registry().find("diff_pruning")->params, {}));
  CATCH_CHECK_NOTHROW(again->call("load_state", [&](Method& m) { m.load_state(projected); }));
  again->detach(*model);
  auto other = test::registry().create("diff_pruning", "diff");
  other->attach(*model, {}, apply_schema(test::registry().find("diff_pruning")->params, {}));
  CATCH_CHECK_THROWS_WITH(other->call("load_state", [&](Method& m) { m.load_state({{"encoder.layer.9.output.dense.weight.diff_w", at::zeros({1})}}); }),
                          Catch::Contains("'encoder.layer.9.output.dense.weight.diff_w' is not part of this diff-pruning adapter"));
  CATCH_CHECK_THROWS_AS(apply_schema(test::registry().find("diff_pruning")->params, {{"target_ratio", 0.0}}), std::exception);
  for (const double at : {0.0, 1.0})
    CATCH_CHECK_THROWS_WITH(other->call("validate", [&](Method& m) { m.validate(apply_schema(test::registry().find("diff_pruning")->params, {{"prune_at", at}})); }),
                            Catch::Contains("prune_at must be in (0, 1)"));
}
