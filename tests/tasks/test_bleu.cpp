// Our corpus BLEU against sacrebleu (fixtures/make_seq2seq.py) on real sentences.
#include "support.h"

#include "tasks/bleu.h"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace tessera;

CATCH_TEST_CASE("corpus BLEU and the 13a tokenizer equal sacrebleu", "[train][bleu]") {
  nlohmann::json b;
  std::ifstream(test::fixture("seq2seq/bleu.json")) >> b;
  for (const auto& [text, tokens] : b["tokenized"].items()) {
    CATCH_INFO(text);
    CATCH_CHECK(tokenize_13a(text) == tokens.get<std::string>());
  }
  const auto hyps = b["hypotheses"].get<std::vector<std::string>>(), refs = b["references"].get<std::vector<std::string>>();
  const auto score = corpus_bleu(hyps, refs);
  CATCH_CHECK(std::abs(score.score - b["score"].get<double>()) < 1e-9);
  CATCH_CHECK(score.score > 10);
  CATCH_CHECK(score.score < 90);
  // A pair with no 2-grams in common: the smoothed orders decide the score.
  CATCH_CHECK(std::abs(corpus_bleu({hyps[0]}, {refs[1]}).score - b["partial"].get<double>()) < 1e-9);
  CATCH_CHECK(std::abs(corpus_bleu(refs, refs).score - 100.0) < 1e-9);
  CATCH_CHECK(corpus_bleu({"a b c d"}, {"w x y z"}).score == 0.0);
  CATCH_CHECK_THROWS_WITH(corpus_bleu({"a"}, {}), Catch::Contains("as many references"));
}
