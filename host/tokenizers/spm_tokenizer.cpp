#include "tokenizers/spm_tokenizer.h"

#include "formats/json_file.h"
#include "tokenizers/spm_proto.h"

#include <nlohmann/json.hpp>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <filesystem>
#include <stdexcept>

namespace tessera {

SpmTokenizer::~SpmTokenizer() = default;

std::unique_ptr<SpmTokenizer> SpmTokenizer::from_directory(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string file = find_spm_model(dir);
  if (file.empty()) throw std::runtime_error(dir + ": neither tokenizer.model nor spiece.model found");
  std::unique_ptr<SpmTokenizer> t(new SpmTokenizer());
  t->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = t->sp_->Load(file);
  if (!status.ok()) throw std::runtime_error(file + ": not a SentencePiece model (" + status.ToString() + ")");
  t->pieces_ = static_cast<std::size_t>(t->sp_->GetPieceSize());

  nlohmann::json tc = nlohmann::json::object();
  if (fs::exists(fs::path(dir) / "tokenizer_config.json")) tc = read_json_file((fs::path(dir) / "tokenizer_config.json").string());
  // The named token when the model has that piece, else SentencePiece's own id for the role.
  auto id_of = [&](const char* key, int fallback) -> std::int64_t {
    const std::string text = json_token_or(tc, key, "");
    if (!text.empty()) {
      const int id = t->sp_->PieceToId(text);
      if (id != t->sp_->unk_id() || text == t->sp_->IdToPiece(t->sp_->unk_id())) return id;
    }
    return fallback;
  };
  const std::int64_t bos = id_of("bos_token", t->sp_->bos_id()), eos = id_of("eos_token", t->sp_->eos_id());
  const bool add_bos = json_bool_or(tc, "add_bos_token", false), add_eos = json_bool_or(tc, "add_eos_token", false);
  if (add_bos && bos < 0) throw std::runtime_error(file + ": the template adds BOS but the model has no BOS piece");
  if (add_eos && eos < 0) throw std::runtime_error(file + ": the template adds EOS but the model has no EOS piece");
  t->bos_ = add_bos ? bos : -1;
  t->eos_ = add_eos ? eos : -1;
  t->pad_ = id_of("pad_token", t->sp_->pad_id());
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
  // Control pieces (<s>, </s>, <pad>) decode to nothing in SentencePiece; ids past its
  // pieces are left out too.
  std::vector<int> pieces;
  for (auto id : ids)
    if (id >= 0 && static_cast<std::size_t>(id) < pieces_ && !sp_->IsControl(static_cast<int>(id))) pieces.push_back(static_cast<int>(id));
  std::string out;
  const auto status = sp_->Decode(pieces, &out);
  if (!status.ok()) throw std::runtime_error("SentencePiece could not decode the ids: " + status.ToString());
  return out;
}

}  // namespace tessera
