// The encoder against transformers' BertModel on the real all-MiniLM-L6-v2 weights.
#include "support.h"

#include <fstream>

using namespace tessera;

CATCH_TEST_CASE("BERT hidden states equal transformers", "[model][bert][minilm][parity]") {
  auto model = test::load_minilm();
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  at::NoGradGuard no_grad;
  Encoded e = model->forward(ref["input_ids"], ref["attention_mask"]);
  CATCH_CHECK(e.prompt_length == 0);
  CATCH_CHECK(e.hidden.sizes() == ref["hidden"].sizes());
  TESSERA_CHECK_PARITY(test::parity(e.hidden, ref, "hidden", ref["attention_mask"]));
}

CATCH_TEST_CASE("RoBERTa hidden states equal transformers (tiny random checkpoint)", "[model][bert][parity]") {
  auto model = BertModel::load(test::fixture("tiny_roberta"), test::options());
  test::perturb_if_asked(*model);
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  CATCH_CHECK(model->info().architecture == "roberta");
  CATCH_CHECK(model->match_linear({"query"}).at(0)->hf_path() == "roberta.encoder.layer.0.attention.self.query");
  at::NoGradGuard no_grad;
  Tensor h = model->forward(ref["roberta.input_ids"], ref["roberta.attention_mask"]).hidden;
  TESSERA_CHECK_PARITY(test::parity(h, ref, "roberta.hidden", ref["roberta.attention_mask"]));
}

CATCH_TEST_CASE("a sequence past the position table is refused by name (RoBERTa's table starts at pad + 1)", "[model][bert]") {
  at::NoGradGuard no_grad;
  for (const std::string name : {"tiny_bert_mlm", "tiny_roberta"}) {
    CATCH_INFO(name);
    auto model = BertModel::load(test::fixture(name), test::options());
    const std::int64_t limit = name == "tiny_roberta" ? 40 - 2 : 40;  // max_position_embeddings 40, RoBERTa's pad id 1
    CATCH_CHECK(model->max_tokens() == limit);
    auto ids = [&](std::int64_t T) { return at::full({1, T}, 5, at::TensorOptions().dtype(at::kLong).device(test::device())); };
    CATCH_CHECK_NOTHROW(model->forward(ids(limit), at::ones_like(ids(limit))));
    CATCH_CHECK_THROWS_WITH(model->forward(ids(limit + 1), at::ones_like(ids(limit + 1))),
                            "sequence of " + std::to_string(limit + 1) + " tokens exceeds the " + std::to_string(limit) + " positions of the model");
  }
}

// Not a [parity] case: bf16 resolves 2^-8 of a value, so a 1e-3 change of a weight is below
// what it can see (tests/parity_can_fail.sh). The floor is one bf16 step of the output's size:
// bf16 is never exact here, so the reference's own error carries the tolerance.
CATCH_TEST_CASE("BERT in bf16 is as close to the truth as transformers in bf16", "[model][bert][minilm]") {
  auto model = BertModel::load(test::model_dir(), test::options(at::kBFloat16));
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  at::NoGradGuard no_grad;
  Tensor h = model->forward(ref["input_ids"], ref["attention_mask"]).hidden;
  CATCH_CHECK(h.scalar_type() == at::kBFloat16);
  TESSERA_CHECK_PARITY(test::parity("hidden in bf16", h, ref["hidden.bf16"], ref["hidden.f64"], ref["attention_mask"], 1.0));
  CATCH_CHECK(model->info().param_options.dtype() == at::kFloat);
}

CATCH_TEST_CASE("BERT sites carry canonical names and Hugging Face paths", "[model][bert][minilm]") {
  auto model = test::load_minilm();
  auto q = model->match_linear({"layers.3.attn.q"});
  CATCH_REQUIRE(q.size() == 1);
  CATCH_CHECK(q[0]->hf_path() == "encoder.layer.3.attention.self.query");
  CATCH_CHECK(model->match_linear({"query"}).size() == 6);
  CATCH_CHECK(model->match_linear({"output.dense"}).size() == 12);  // PEFT's suffix rule: attention output and MLP down
  CATCH_CHECK(model->match_linear({"re:.*mlp\\.(up|down)"}).size() == 12);
  CATCH_CHECK(model->linear_sites().size() == 36);
  CATCH_CHECK(model->sublayer_sites().size() == 12);
  CATCH_CHECK(model->layer_sites().size() == 6);
  CATCH_CHECK(model->embedding_site() != nullptr);
}

CATCH_TEST_CASE("a directory that is not a supported model is refused with the reason", "[model][bert]") {
  auto dir = test::temp_dir("notbert");
  {
    std::ofstream((dir / "config.json").string()) << R"({"model_type": "gpt2"})";
  }
  CATCH_CHECK_THROWS_WITH(BertModel::load(dir.string(), at::TensorOptions()), Catch::Contains("model_type 'gpt2' is not supported"));
}

CATCH_TEST_CASE("a batch without padding (no attention mask at all) equals transformers", "[model][bert][minilm][parity]") {
  auto model = test::load_minilm();
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const auto lengths = ref["attention_mask"].sum(1);
  const auto row = lengths.argmax().item<std::int64_t>();  // the longest sentence: no padding in its row
  at::NoGradGuard no_grad;
  Tensor h = model->forward(ref["input_ids"].narrow(0, row, 1), ref["attention_mask"].narrow(0, row, 1)).hidden;
  TESSERA_CHECK_PARITY(test::parity("hidden, one row", h, ref["hidden"].narrow(0, row, 1), ref["hidden.f64"].narrow(0, row, 1)));
}

CATCH_TEST_CASE("masked-LM heads (BertForMaskedLM, RobertaForMaskedLM) equal transformers", "[model][bert][minilm][parity]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  at::NoGradGuard no_grad;
  for (const std::string name : {"roberta", "bert_mlm"}) {
    CATCH_INFO("checkpoint " << name);
    auto model = BertModel::load(test::fixture(name == "roberta" ? "tiny_roberta" : "tiny_bert_mlm"), test::options());
    test::perturb_if_asked(*model);
    CATCH_REQUIRE(model->has_mlm_head());
    CATCH_CHECK(model->ignored_tensors().size() <= 1);  // at most the position_ids buffer
    const auto& mask = ref[name + ".attention_mask"];
    Tensor logits = model->mlm_logits(model->forward(ref["roberta.input_ids"], mask).hidden);
    TESSERA_CHECK_PARITY(test::parity(logits, ref, name + (name == "roberta" ? ".mlm_logits" : ".logits"), mask));
    CATCH_CHECK(model->match_linear({"head"}).at(0)->weight().name() == "embed.word.weight");  // tied
  }
  CATCH_CHECK_THROWS_WITH(test::load_minilm()->mlm_logits(at::zeros({1, 384})), Catch::Contains("no masked-LM head"));
}
