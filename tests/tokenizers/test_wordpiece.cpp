// Our WordPiece tokenizer against the `tokenizers` library (fixture made by
// tests/fixtures/make_fixtures.py on the real all-MiniLM-L6-v2 tokenizer).
#include "support.h"

#include "tokenizers/wordpiece.h"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace tessera;

CATCH_TEST_CASE("WordPiece ids equal the tokenizers library on real and edge-case text", "[model][tokenizer][minilm]") {
  auto tok = WordPieceTokenizer::from_directory(test::model_dir());
  std::ifstream in(test::fixture("tokenizer.json"));
  CATCH_REQUIRE(in);
  auto cases = nlohmann::json::parse(in);
  CATCH_REQUIRE(cases.size() > 200);
  std::size_t mismatches = 0;
  for (const auto& c : cases) {
    const auto text = c["text"].get<std::string>();
    auto ids = tok.encode(text);
    auto ids16 = tok.encode(text, 16);
    if (ids != c["ids"].get<std::vector<std::int64_t>>() || ids16 != c["ids_64"].get<std::vector<std::int64_t>>()) {
      ++mismatches;
      CATCH_INFO("text: " << text);
      CATCH_CHECK(nlohmann::json(ids).dump() == c["ids"].dump());
    }
  }
  CATCH_CHECK(mismatches == 0);
}

CATCH_TEST_CASE("WordPiece reads vocab.txt alone the same way", "[model][tokenizer][minilm]") {
  auto dir = test::temp_dir("vocab");
  std::filesystem::copy_file(std::filesystem::path(test::model_dir()) / "vocab.txt", dir / "vocab.txt");
  auto from_vocab = WordPieceTokenizer::from_directory(dir.string());
  std::ifstream in(test::fixture("tokenizer.json"));
  CATCH_REQUIRE(in);
  std::size_t mismatches = 0;
  for (const auto& c : nlohmann::json::parse(in))
    mismatches += from_vocab.encode(c["text"].get<std::string>()) != c["ids"].get<std::vector<std::int64_t>>();
  CATCH_CHECK(mismatches == 0);
}
