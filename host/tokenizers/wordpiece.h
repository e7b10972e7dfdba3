// BERT's WordPiece tokenizer, read from a Hugging Face `tokenizer.json` (or `vocab.txt`
// with `tokenizer_config.json`), matching the `tokenizers` library id for id:
// BertNormalizer (clean text, CJK spacing, accent stripping, lowercasing), the BERT
// pre-tokenizer (whitespace and punctuation), greedy longest-match WordPiece, and the
// [CLS] … [SEP] template.
#pragma once

#include "tokenizers/tokenizer.h"

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace tessera {

class WordPieceTokenizer final : public Tokenizer {
 public:
  // `dir` is a Hugging Face model directory.
  static WordPieceTokenizer from_directory(const std::string& dir);

  // Token ids with the special tokens; at most max_length ids (0 = no limit), truncated
  // from the end like `truncation=True`.
  std::vector<std::int64_t> encode(const std::string& text, std::size_t max_length = 0, bool add_special = true) const override;
  // Pieces joined by spaces, "##" continuations glued on (BERT's WordPiece decoder).
  std::string decode(const std::vector<std::int64_t>& ids) const override;
  // The word pieces without special tokens (for tests and inspection).
  std::vector<std::string> tokenize(const std::string& text) const;

  std::int64_t pad_id() const override { return pad_id_; }
  std::size_t vocab_size() const override { return vocab_.size(); }

 private:
  std::u32string normalize(const std::string& text) const;
  void word_pieces(const std::u32string& word, std::vector<std::int64_t>& ids, std::vector<std::string>* pieces) const;
  std::vector<std::int64_t> ids_of(const std::string& text, std::vector<std::string>* pieces) const;

  std::unordered_map<std::string, std::int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::string prefix_ = "##";
  std::size_t max_chars_per_word_ = 100;
  bool lowercase_ = true, strip_accents_ = true, clean_text_ = true, chinese_chars_ = true;
  std::int64_t unk_id_ = 0, cls_id_ = 0, sep_id_ = 0, pad_id_ = 0;
};

}  // namespace tessera
