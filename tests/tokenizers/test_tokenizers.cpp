// BPE and Unigram tokenizers of every supported shape against the `tokenizers` library, on
// a multi-language sample (fixtures/make_tokenizers.py trains them on the real corpus; the
// T5 ones carry the Precompiled charsmap of a real SentencePiece model), and SentencePiece
// `.model` files alone against transformers (T5, Llama classes) or the `sentencepiece`
// package (other classes, read by libsentencepiece).
#include "support.h"

#include "train/dataset.h"
#include "tokenizers/json_tokenizer.h"
#include "tokenizers/spm_tokenizer.h"
#include "tokenizers/tokenizer.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <iterator>

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

CATCH_TEST_CASE("a SentencePiece .model alone equals transformers for T5 and Llama classes, and the sentencepiece package for others", "[model][tokenizer]") {
  nlohmann::json all;
  std::ifstream(test::fixture("tokenizers/spm_cases.json")) >> all;
  CATCH_REQUIRE(all.size() == 5);
  for (const auto& [name, spec] : all.items()) {
    auto tok = load_tokenizer(test::fixture("tokenizers/" + name));
    // T5/Llama classes run transformers' pipeline (special tokens cut out of the text);
    // another class runs libsentencepiece.
    const bool transformers = spec["reference"] == "transformers";
    CATCH_CHECK((dynamic_cast<JsonTokenizer*>(tok.get()) != nullptr) == transformers);
    CATCH_CHECK((dynamic_cast<SpmTokenizer*>(tok.get()) != nullptr) == !transformers);
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
  // The same for the classes whose pipeline is built from the model's fields, and for a
  // real model cut short.
  auto t5 = test::temp_dir("spm-bad-t5");
  std::ofstream((t5 / "tokenizer_config.json").string()) << R"({"tokenizer_class": "T5Tokenizer"})";
  std::ofstream((t5 / "spiece.model").string()) << "not a model";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(t5.string()), Catch::Contains("spiece.model: not a SentencePiece model (wire type 6"));
  std::string real;
  {
    std::ifstream in(test::fixture("tokenizers/spm_t5/spiece.model"), std::ios::binary);
    real.assign(std::istreambuf_iterator<char>(in), {});
  }
  std::ofstream((t5 / "spiece.model").string(), std::ios::binary) << real.substr(0, real.size() / 2);
  CATCH_CHECK_THROWS_WITH(load_tokenizer(t5.string()), Catch::Contains("spiece.model: not a SentencePiece model (a field of"));
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
  // Ids that would index outside the tables (a negative id was a segmentation fault).
  const auto tokenizer_json = (dir / "tokenizer.json").string();
  std::ofstream(tokenizer_json) << R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": -1}, "merges": []}})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains(tokenizer_json + ": token 'b' has id -1, outside [0, "));
  std::ofstream(tokenizer_json) << R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    "added_tokens": [{"id": 1099511627776, "content": "<s>"}]})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains(tokenizer_json + ": token '<s>' has id 1099511627776, outside [0, "));
  std::ofstream(tokenizer_json) << R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    "post_processor": {"type": "RobertaProcessing", "cls": ["<s>", 5], "sep": ["</s>", 0]}})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains(tokenizer_json + ": post_processor's special token id 5 is outside the vocabulary (1 ids)"));
  // A value of the wrong type anywhere: the file and the place in it.
  std::ofstream(tokenizer_json) << R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": "yes"}})";
  CATCH_CHECK_THROWS_WITH(load_tokenizer(dir.string()), Catch::Contains(tokenizer_json + ": ") && Catch::Contains("(/model/byte_fallback) type must be boolean"));
}

CATCH_TEST_CASE("the real SmolLM2 GGUF's own tokenizer (tokenizer.ggml.*) encodes as transformers' conversion of it does", "[tokenizers][gguf][real]") {
  const char* gguf = std::getenv("TESSERA_DECODER_GGUF");
  CATCH_REQUIRE(gguf != nullptr);
  // The converted directory's tokenizer.json is transformers' reading of the same file.
  const auto ours = load_tokenizer(gguf), theirs = load_tokenizer(test::decoder_dir());
  CATCH_CHECK(ours->vocab_size() == theirs->vocab_size());
  auto rows = read_csv(std::string(std::getenv("TESSERA_DATA_DIR")) + "/polarity.csv");
  std::vector<std::string> texts = {"<|im_start|>user\nIs 1234 + 56 = 1290?<|im_end|>\n", "  spaces   and\ttabs\n\nnewlines", "café naïve 東京 🙂", ""};
  for (std::size_t r = 1; r < rows.size() && r < 400; ++r) texts.push_back(rows[r][0]);
  std::size_t tokens = 0;
  for (const auto& t : texts) {
    CATCH_INFO(t);
    const auto a = ours->encode(t), b = theirs->encode(t);
    CATCH_CHECK(a == b);
    CATCH_CHECK(ours->decode(a) == theirs->decode(b));
    tokens += a.size();
  }
  CATCH_CHECK(tokens > 5000);
  CATCH_CHECK(ours->encode("<|im_start|>")[0] == 1);  // a control token is matched whole
}
