// T5 against transformers and peft on tiny random checkpoints that
// fixtures/make_seq2seq.py saves with save_pretrained.
#include "support.h"

#include "architectures/generate.h"
#include "architectures/t5.h"
#include "tasks/head_loss.h"
#include "runtime/peft_import.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>

using namespace tessera;

namespace {

std::string seq2seq_fixture(const std::string& name) { return test::fixture("seq2seq/" + name); }

NamedTensors& reference() { return test::cached_tensors(seq2seq_fixture("reference.safetensors")); }

std::unique_ptr<T5Model> load(const std::string& name) {
  auto m = T5Model::load(seq2seq_fixture(name), test::options());
  test::perturb_if_asked(*m);
  return m;
}

// Next-token loss of the decoder against labels (B, T), -100 ignored, as transformers computes it.
Tensor seq2seq_loss(const Tensor& logits, const Tensor& labels) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), labels.reshape({-1}), {}, at::Reduction::Mean, -100);
}

// Relative difference: these checkpoints use large weights (initializer_factor 10).
double rel_diff(const Tensor& a, const Tensor& b) { return test::max_abs_diff(a, b) / b.abs().max().item<double>(); }

}  // namespace

CATCH_TEST_CASE("T5 and T5 v1.1 equal transformers: encoder states, logits and loss", "[model][t5][parity]") {
  auto& ref = reference();
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  for (const std::string name : {"t5", "t5_v1_1", "t5_asym"}) {
    CATCH_INFO("checkpoint " << name);
    auto model = load(name);
    CATCH_CHECK(model->ignored_tensors().empty());
    at::NoGradGuard no_grad;
    Encoded enc = model->encode(ids, mask);
    TESSERA_CHECK_PARITY(test::parity(enc.hidden, ref, name + ".encoder", mask));
    Tensor logits = model->logits(model->decode(ref[name + ".decoder_input_ids"], enc));
    TESSERA_CHECK_PARITY(test::parity(logits, ref, name + ".logits"));
    TESSERA_CHECK_PARITY(test::parity("loss", seq2seq_loss(logits, ref["labels"]).item<double>(), ref, name + ".loss"));
    auto [rows, next] = labelled_rows(model->head_input(model->decode(ref[name + ".decoder_input_ids"], enc)), ref["labels"]);
    const double fused = (head_loss_sum(model->head(), rows, next) / static_cast<double>(next.size(0))).item<double>();
    TESSERA_CHECK_PARITY(test::parity("fused head loss", fused, ref, name + ".loss"));
  }
}

CATCH_TEST_CASE("T5 greedy generation with the cache equals transformers.generate token for token", "[model][t5]") {
  nlohmann::json runs;
  std::ifstream(seq2seq_fixture("generate.json")) >> runs;
  CATCH_REQUIRE(runs.size() == 2);
  for (const auto& [name, run] : runs.items()) {
    CATCH_INFO("checkpoint " << name);
    auto model = load(name);
    GenerateOptions o;
    o.max_new_tokens = 32;
    o.eos_token_ids = {model->config().eos_token_id};
    o.pad_token_id = model->config().pad_token_id;
    auto ours = generate(*model, run["sources"].get<std::vector<std::vector<std::int64_t>>>(), o);
    auto theirs = run["tokens"].get<std::vector<std::vector<std::int64_t>>>();
    for (std::size_t i = 0; i < ours.size(); ++i) {
      // transformers pads a row that ended early; ours stops at its EOS.
      auto expected = theirs[i];
      expected.resize(ours[i].size());
      CATCH_CHECK(ours[i] == expected);
      if (ours[i].size() < theirs[i].size()) CATCH_CHECK(ours[i].back() == o.eos_token_ids[0]);
    }
  }
}

CATCH_TEST_CASE("T5 sites: canonical names per stack, PEFT's q/v targets resolve in self and cross attention", "[model][t5]") {
  auto model = load("t5_v1_1");
  CATCH_CHECK(model->match_linear({"q"}).size() == 2 + 2 * 2);  // encoder self, decoder self and cross
  CATCH_CHECK(model->match_linear({"decoder.layers.1.cross.k"}).at(0)->hf_path() == "decoder.block.1.layer.1.EncDecAttention.k");
  CATCH_CHECK(model->match_linear({"attn.q"}).size() == 4);
  CATCH_CHECK(model->match_linear({"mlp.gate"}).at(0)->hf_path() == "encoder.block.0.layer.1.DenseReluDense.wi_0");
  CATCH_CHECK(model->sublayer_sites().size() == 2 * 2 + 3 * 2);
}

CATCH_TEST_CASE("(IA)3 on T5 equals peft with its defaults (k, v in every attention, wo feed-forward), merged too", "[model][t5][ia3][parity]") {
  auto& ref = reference();
  auto model = load("t5");
  auto ia3 = test::attach_peft_adapter(seq2seq_fixture("t5_ia3"), *model);
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  auto logits = [&] { return model->logits(model->decode(ref["t5.decoder_input_ids"], model->encode(ids, mask))); };
  at::NoGradGuard no_grad;
  TESSERA_CHECK_PARITY(test::parity(logits(), ref, "t5.ia3_logits"));
  CATCH_CHECK(rel_diff(logits(), ref["t5.logits"]) > 1e-3);
  ia3->call("merge", [](Method& m) { m.merge(); });
  TESSERA_CHECK_PARITY(test::parity(logits(), ref, "t5.ia3_logits"));
  ia3->call("unmerge", [](Method& m) { m.unmerge(); });
  ia3->detach(*model);
  TESSERA_CHECK_PARITY(test::parity(logits(), ref, "t5.logits"));
}

CATCH_TEST_CASE("LoRA on T5 equals peft (q, v in both stacks and wo) and trains", "[model][t5][lora][parity]") {
  auto& ref = reference();
  auto model = load("t5");
  const auto dir = seq2seq_fixture("t5_lora");
  auto lora = test::attach_peft_adapter(dir, *model);
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  auto logits = [&] { return model->logits(model->decode(ref["t5.decoder_input_ids"], model->encode(ids, mask))); };
  {
    at::NoGradGuard no_grad;
    TESSERA_CHECK_PARITY(test::parity(logits(), ref, "t5.lora_logits"));
    CATCH_CHECK(rel_diff(logits(), ref["t5.logits"]) > 1e-3);
  }
  // A few SGD steps on the adapter lower the loss. The steps are clipped to a total gradient
  // norm of 10 (as a trainer clips): this checkpoint's scores are unscaled and large, its
  // softmax saturated, and unclipped steps (gradients of 10⁴ after one step) make a path on
  // which float32 rounding alone decides the end point — the q adapters' gradients are ~1e-10
  // in float64 and rounding noise of ~0.04 in float32, so summing in another order changed
  // whether the loss fell by 10%.
  std::vector<Tensor> params;
  for (auto& [k, t] : lora->call("trainable", [](Method& m) { return m.trainable(); })) params.push_back(t);
  const double first = seq2seq_loss(logits(), ref["labels"]).item<double>();
  for (int step = 0; step < 20; ++step) {
    Tensor loss = seq2seq_loss(logits(), ref["labels"]);
    for (auto& t : params)
      if (t.grad().defined()) t.mutable_grad().zero_();
    loss.backward();
    at::NoGradGuard ng;
    double squares = 0.0;
    for (auto& t : params) squares += t.grad().to(at::kDouble).pow(2).sum().item<double>();
    const double lr = 0.05 * std::min(1.0, 10.0 / std::sqrt(squares));
    for (auto& t : params) t.sub_(t.grad() * lr);
  }
  const double last = seq2seq_loss(logits(), ref["labels"]).item<double>();
  CATCH_INFO("loss " << first << " -> " << last);
  CATCH_CHECK(last < 0.7 * first);
  lora->detach(*model);
}
