// BPE and Unigram tokenizers of every supported shape against the `tokenizers` library, on
// a multi-language sample (fixtures/make_tokenizers.py trains them on the real corpus; the
// T5 ones carry the Precompiled charsmap of a real SentencePiece model), and SentencePiece
// `.model` files read by libsentencepiece against the `sentencepiece` package.
#include "support.h"

#include "model/json_tokenizer.h"
#include "model/spm_tokenizer.h"
#include "model/tokenizer.h"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace tessera;

CATCH_TEST_CASE("BPE and Unigram tokenizers equal the tokenizers library id for id, and decode alike", "[model][tokenizer]") {
  nlohmann::json all;
  std::ifstream(test::fixture("tokenizers/cases.json")) >> all;
  CATCH_REQUIRE(all.size() == 8);
  for (const auto& [name, cases] : all.items()) {
    auto tok = load_tokenizer(test::fixture("tokenizers/" + name));
    CATCH_REQUIRE(dynamic_cast<JsonTokenizer*>(tok.get()) != nullptr);
    std::size_t equal = 0, decoded = 0;
    for (const auto& c : cases) {
      const auto text = c["text"].get<std::string>();
      const auto expected = c["ids"].get<std::vector<std::int64_t>>();
      const auto ids = tok->encode(text);
      CATCH_INFO(name << ": " << text);
      CATCH_CHECK(ids == expected);
      CATCH_CHECK(tok->encode(text, 16) == c["ids_16"].get<std::vector<std::int64_t>>());
      CATCH_CHECK(tok->decode(expected) == c["decoded"].get<std::string>());
      equal += ids == expected;
      decoded += tok->decode(expected) == c["decoded"].get<std::string>();
    }
    CATCH_INFO(name << ": " << equal << "/" << cases.size() << " encoded, " << decoded << " decoded equal");
    CATCH_CHECK(equal == cases.size());
  }
}

CATCH_TEST_CASE("a SentencePiece .model alone (T5's spiece.model, Llama's tokenizer.model) equals the sentencepiece package with the model's template", "[model][tokenizer]") {
  nlohmann::json all;
  std::ifstream(test::fixture("tokenizers/spm_cases.json")) >> all;
  CATCH_REQUIRE(all.size() == 2);
  for (const auto& [name, spec] : all.items()) {
    auto tok = load_tokenizer(test::fixture("tokenizers/" + name));
    auto* spm = dynamic_cast<SpmTokenizer*>(tok.get());
    CATCH_REQUIRE(spm != nullptr);
    CATCH_CHECK(spm->adds_bos() == (name == "spm_llama"));  // Llama: <s> first; T5: </s> last
    CATCH_CHECK(spm->adds_eos() == (name == "spm_t5"));
    CATCH_CHECK(tok->vocab_size() == spec["vocab_size"].get<std::size_t>());  // T5: the pieces and 3 extra ids
    CATCH_CHECK(tok->pad_id() == spec["pad_id"].get<std::int64_t>());
    std::size_t equal = 0;
    for (const auto& c : spec["rows"]) {
      const auto text = c["text"].get<std::string>();
      const auto expected = c["ids"].get<std::vector<std::int64_t>>();
      CATCH_INFO(name << ": " << text);
      CATCH_CHECK(tok->encode(text) == expected);
      CATCH_CHECK(tok->encode(text, 16) == c["ids_16"].get<std::vector<std::int64_t>>());
      CATCH_CHECK(tok->decode(expected) == c["decoded"].get<std::string>());
      equal += tok->encode(text) == expected;
    }
    CATCH_INFO(name << ": " << equal << "/" << spec["rows"].size() << " equal");
    CATCH_CHECK(equal == spec["rows"].size());
  }
  // A file that is not a SentencePiece model is refused naming it.
  auto dir = test::temp_dir("spm-bad");
  std::ofstream((dir / "tokenizer.model").string()) << "not a model";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains("tokenizer.model: not a SentencePiece model"));
}

CATCH_TEST_CASE("tokenizer directories that cannot be read are refused with the reason", "[model][tokenizer]") {
  auto dir = test::temp_dir("tokenizer-bad");
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains("no tokenizer.json"));
  std::ofstream((dir / "tokenizer.json").string()) << R"({"model": {"type": "WordLevel", "vocab": {}}})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains("tokenizer model 'WordLevel' is not supported"));
  std::ofstream((dir / "tokenizer.json").string()) << R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains("merge 'a b' uses a token missing"));
  std::ofstream((dir / "tokenizer.json").string()) << R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": false}})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains("does not compile"));
  std::ofstream((dir / "tokenizer.json").string()) << R"({"model": {"type": "Unigram", "vocab": [["a", 0.0]]},
    "normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAQAA=="}})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains("(normalizer): Precompiled charsmap: trie of 1048576 bytes does not fit"));
  std::ofstream((dir / "tokenizer.json").string()) << R"({"model": {"type": "Unigram", "vocab": [["a", 0.0]]},
    "normalizer": {"type": "Precompiled", "precompiled_charsmap": "no spaces!"}})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains("is not base64"));
}
