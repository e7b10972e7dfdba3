#include "tokenizers/gguf_tokenizer.h"

#include "formats/gguf.h"

#include <stdexcept>

namespace tessera {
namespace {

const nlohmann::json& need(const GgufFile& f, const std::string& key) {
  if (!f.metadata().contains(key)) throw GgufError(f.path(), "", "metadata has no '" + key + "', which its tokenizer needs");
  return f.metadata()[key];
}

}  // namespace

nlohmann::json gguf_tokenizer_json(const GgufFile& f) {
  const std::string model = need(f, "tokenizer.ggml.model").get<std::string>();
  if (model != "gpt2")
    throw GgufError(f.path(), "", "tokenizer.ggml.model is '" + model + "': only byte-level BPE ('gpt2') tokenizers are read from a GGUF file; give [model] tokenizer");
  const auto& tokens = need(f, "tokenizer.ggml.tokens");
  const auto& merges = need(f, "tokenizer.ggml.merges");
  const nlohmann::json types = f.metadata().value("tokenizer.ggml.token_type", nlohmann::json::array());
  nlohmann::json vocab = nlohmann::json::object(), added = nlohmann::json::array();
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const std::string t = tokens[i].get<std::string>();
    vocab[t] = i;
    if (i < types.size() && types[i].get<int>() == 3)  // control: special, matched whole before the split
      added.push_back({{"id", i}, {"content", t}, {"single_word", false}, {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", true}});
  }
  const nlohmann::json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  nlohmann::json single = nlohmann::json::array({{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}});
  nlohmann::json special = nlohmann::json::object();
  if (f.metadata().value("tokenizer.ggml.add_bos_token", false)) {
    const auto bos = need(f, "tokenizer.ggml.bos_token_id").get<std::int64_t>();
    const std::string b = tokens.at(static_cast<std::size_t>(bos)).get<std::string>();
    single.insert(single.begin(), {{"SpecialToken", {{"id", b}, {"type_id", 0}}}});
    special[b] = {{"id", b}, {"ids", {bos}}, {"tokens", {b}}};
  }
  return {{"version", "1.0"},
          {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer", byte_level},
          {"post_processor", {{"type", "TemplateProcessing"}, {"single", single}, {"pair", single}, {"special_tokens", special}}},
          {"decoder", byte_level},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", ""}, {"end_of_word_suffix", ""},
            {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab}, {"merges", merges}}}};
}

}  // namespace tessera
