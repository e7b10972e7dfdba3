#include "model/spm_tokenizer.h"

#include "model/json_file.h"

#include <nlohmann/json.hpp>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <filesystem>
#include <stdexcept>

namespace tessera {
namespace {

// A special token as tokenizer_config.json writes it: "</s>" or {"content": "</s>", …}.
std::string token_text(const nlohmann::json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return "";
}

}  // namespace

SpmTokenizer::~SpmTokenizer() = default;

std::unique_ptr<SpmTokenizer> SpmTokenizer::from_directory(const std::string& dir) {
  namespace fs = std::filesystem;
  fs::path file = fs::path(dir) / "tokenizer.model";
  if (!fs::exists(file)) file = fs::path(dir) / "spiece.model";
  if (!fs::exists(file)) throw std::runtime_error(dir + ": neither tokenizer.model nor spiece.model found");
  std::unique_ptr<SpmTokenizer> t(new SpmTokenizer());
  t->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = t->sp_->Load(file.string());
  if (!status.ok()) throw std::runtime_error(file.string() + ": not a SentencePiece model (" + status.ToString() + ")");
  t->pieces_ = static_cast<std::size_t>(t->sp_->GetPieceSize());

  nlohmann::json tc = nlohmann::json::object(), mc = nlohmann::json::object();
  if (fs::exists(fs::path(dir) / "tokenizer_config.json")) tc = read_json_file((fs::path(dir) / "tokenizer_config.json").string());
  if (fs::exists(fs::path(dir) / "config.json")) mc = read_json_file((fs::path(dir) / "config.json").string());
  const std::string cls = tc.value("tokenizer_class", ""), type = mc.value("model_type", "");
  const bool t5 = cls.rfind("T5", 0) == 0 || type == "t5";
  const bool llama = cls.rfind("Llama", 0) == 0 || type == "llama" || type == "mistral";
  const bool add_bos = tc.contains("add_bos_token") && tc["add_bos_token"].is_boolean() ? tc["add_bos_token"].get<bool>() : llama;
  const bool add_eos = tc.contains("add_eos_token") && tc["add_eos_token"].is_boolean() ? tc["add_eos_token"].get<bool>() : t5;
  // The named token when the model has that piece, else SentencePiece's own id for the role.
  auto id_of = [&](const char* key, int fallback) -> std::int64_t {
    const std::string text = tc.contains(key) ? token_text(tc[key]) : "";
    if (!text.empty()) {
      const int id = t->sp_->PieceToId(text);
      if (id != t->sp_->unk_id() || text == t->sp_->IdToPiece(t->sp_->unk_id())) return id;
    }
    return fallback;
  };
  const std::int64_t bos = id_of("bos_token", t->sp_->bos_id()), eos = id_of("eos_token", t->sp_->eos_id());
  if (add_bos && bos < 0) throw std::runtime_error(file.string() + ": the template adds BOS but the model has no BOS piece");
  if (add_eos && eos < 0) throw std::runtime_error(file.string() + ": the template adds EOS but the model has no EOS piece");
  t->bos_ = add_bos ? bos : -1;
  t->eos_ = add_eos ? eos : -1;
  t->pad_ = id_of("pad_token", t->sp_->pad_id());
  const std::int64_t extra = t5 ? json_int_or(tc, "extra_ids", 100) : 0;
  t->vocab_ = t->pieces_ + static_cast<std::size_t>(std::max<std::int64_t>(0, extra));
  return t;
}

std::vector<std::int64_t> SpmTokenizer::encode(const std::string& text, std::size_t max_length, bool add_special) const {
  std::vector<int> pieces;
  const auto status = sp_->Encode(text, &pieces);
  if (!status.ok()) throw std::runtime_error("SentencePiece could not encode the text: " + status.ToString());
  const bool bos = add_special && bos_ >= 0, eos = add_special && eos_ >= 0;
  // Truncation keeps room for the template's tokens, as transformers' truncation=True does.
  const std::size_t specials = (bos ? 1 : 0) + (eos ? 1 : 0);
  std::size_t keep = pieces.size();
  if (max_length > 0) keep = std::min(keep, max_length > specials ? max_length - specials : 0);
  std::vector<std::int64_t> ids;
  ids.reserve(keep + specials);
  if (bos) ids.push_back(bos_);
  ids.insert(ids.end(), pieces.begin(), pieces.begin() + static_cast<std::ptrdiff_t>(keep));
  if (eos) ids.push_back(eos_);
  return ids;
}

std::string SpmTokenizer::decode(const std::vector<std::int64_t>& ids) const {
  // Control pieces (<s>, </s>, <pad>) decode to nothing in SentencePiece; the extra ids
  // past its pieces are special tokens too, left out like them.
  std::vector<int> pieces;
  for (auto id : ids)
    if (id >= 0 && static_cast<std::size_t>(id) < pieces_ && !sp_->IsControl(static_cast<int>(id))) pieces.push_back(static_cast<int>(id));
  std::string out;
  const auto status = sp_->Decode(pieces, &out);
  if (!status.ok()) throw std::runtime_error("SentencePiece could not decode the ids: " + status.ToString());
  return out;
}

}  // namespace tessera
