// A Hugging Face `tokenizer.json` pipeline with a BPE model (Sennrich et al. 2016) or a
// Unigram model (Kudo 2018, SentencePiece's: T5), equal to the `tokenizers` library id for
// id. The pipeline, per text:
//
//   1. added tokens (<s>, <|endoftext|> …) are cut out of the raw text first;
//   2. each remaining segment is normalized and 3. pre-tokenized into pieces by the file's
//      steps (tokenizer_steps.h);
//   4. BPE: each piece is merged by rank. Unigram: the segmentation of highest total log
//      probability (Viterbi), an unknown character scoring min − 10 as in SentencePiece.
//      Unknown characters become <0xXX> byte tokens when the model has byte_fallback, else
//      the unknown token (consecutive ones fused);
//   5. the post-processor's template adds BOS/EOS/CLS/SEP.
//
// Decoding runs the file's decoder chain (tokenizer_steps.h). Models with
// continuing_subword_prefix or end_of_word_suffix are refused.
#pragma once

#include "tokenizers/tokenizer.h"
#include "tokenizers/tokenizer_steps.h"

#include <nlohmann/json_fwd.hpp>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace tessera {

class JsonTokenizer final : public Tokenizer {
 public:
  // j: the parsed tokenizer.json; path names it in errors.
  JsonTokenizer(const nlohmann::json& j, const std::string& path);
  ~JsonTokenizer() override;

  std::vector<std::int64_t> encode(const std::string& text, std::size_t max_length = 0, bool add_special = true) const override;
  std::string decode(const std::vector<std::int64_t>& ids) const override;
  std::int64_t pad_id() const override { return pad_id_; }
  std::size_t vocab_size() const override { return id_to_token_.size(); }

 private:
  struct Added {
    std::string content;
    std::int64_t id;
    bool special, lstrip, rstrip;
  };
  struct Template {  // what the post-processor wraps around the sequence
    std::vector<std::int64_t> before, after;
  };
  void read_unigram(const nlohmann::json& model);
  void read_bpe(const nlohmann::json& model, const std::string& path);
  // added_tokens; sizes the id tables and returns their size (highest id + 1).
  std::int64_t read_added(const nlohmann::json& j, const std::string& path);
  void read_template(const nlohmann::json& j, const std::string& path);  // the post-processor's, for one sequence
  void bpe(const std::string& piece, std::vector<std::int64_t>& out) const;
  void unigram(const std::string& piece, std::vector<std::int64_t>& out) const;
  // Unknown characters of `ch` as byte tokens (byte fallback) or the unknown id, fused.
  void unknown(const std::string& ch, std::vector<std::int64_t>& sym, std::vector<bool>& frozen, bool& last_unk) const;
  std::vector<std::int64_t> ids_of(const std::string& text) const;

  std::unordered_map<std::string, std::int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::uint64_t, std::pair<std::int64_t, std::int64_t>> merges_;  // (a, b) -> (rank, merged id)
  std::vector<Added> added_;                                                         // longest content first
  std::vector<bool> special_;                                                        // per id: a special added token
  std::vector<TokenizerStep> normalizers_, pre_tokenizers_, decoders_;
  Template template_;
  std::int64_t unk_id_ = -1, pad_id_ = -1;
  bool unigram_ = false;
  std::vector<double> scores_;  // Unigram: log probability per id
  double min_score_ = 0;
  std::size_t max_piece_chars_ = 1;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  std::int64_t byte_ids_[256];  // <0xXX> token ids for byte fallback (-1 if absent)
};

}  // namespace tessera
