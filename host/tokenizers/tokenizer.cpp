#include "tokenizers/tokenizer.h"

#include "tokenizers/json_tokenizer.h"
#include "formats/checkpoint.h"
#include "formats/gguf.h"
#include "formats/json_file.h"
#include "tokenizers/gguf_tokenizer.h"
#include "tokenizers/spm_convert.h"
#include "tokenizers/spm_proto.h"
#include "tokenizers/spm_tokenizer.h"
#include "tokenizers/wordpiece.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <stdexcept>

namespace tessera {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir) {
  namespace fs = std::filesystem;
  if (is_gguf_file(dir)) {  // a GGUF model file: its own tokenizer.ggml.*
    try {
      return std::make_unique<JsonTokenizer>(gguf_tokenizer_json(*GgufFile::open(dir)), dir);
    } catch (...) {
      rethrow_naming(dir);
    }
  }
  const fs::path json = fs::path(dir) / "tokenizer.json";
  if (fs::exists(json)) {
    try {
      const auto j = read_json_file(json.string());
      const std::string type = j.contains("model") && j["model"].is_object() ? j["model"].value("type", "") : "";
      if (type == "WordPiece") return std::make_unique<WordPieceTokenizer>(WordPieceTokenizer::from_directory(dir));
      if (type == "BPE" || type == "Unigram") return std::make_unique<JsonTokenizer>(j, json.string());
      throw std::runtime_error(json.string() + ": tokenizer model '" + type + "' is not supported (supported: WordPiece, BPE, Unigram)");
    } catch (...) {
      rethrow_naming(json.string());
    }
  }
  if (const std::string model = find_spm_model(dir); !model.empty()) {
    try {
      if (auto j = spm_tokenizer_json(dir)) return std::make_unique<JsonTokenizer>(*j, model);  // T5, Llama: transformers' pipeline
      return SpmTokenizer::from_directory(dir);
    } catch (...) {
      rethrow_naming(model + " (with tokenizer_config.json)");
    }
  }
  if (fs::exists(fs::path(dir) / "vocab.txt")) return std::make_unique<WordPieceTokenizer>(WordPieceTokenizer::from_directory(dir));
  throw std::runtime_error(dir + ": no tokenizer.json (nor a SentencePiece tokenizer.model / spiece.model, nor vocab.txt for WordPiece); "
                           "a tokenizer saved only as vocab.json + merges.txt must be converted to tokenizer.json at set-up");
}

}  // namespace tessera
