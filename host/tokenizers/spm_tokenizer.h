// A SentencePiece `.model` file read by libsentencepiece itself, for a directory whose
// tokenizer class is not one spm_convert.h builds transformers' pipeline for (T5, Llama):
// SentencePiece does the normalization and segmentation, and the ids are SentencePiece's
// own. The template around them is what tokenizer_config.json says: BOS first when
// add_bos_token, EOS last when add_eos_token (the named bos_token / eos_token, else the
// model's own). Special tokens written inside a text are read as characters, as
// SentencePiece reads them.
#pragma once

#include "tokenizers/tokenizer.h"

#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace tessera {

class SpmTokenizer : public Tokenizer {
 public:
  // dir/tokenizer.model, else dir/spiece.model; errors name the file and SentencePiece's reason.
  static std::unique_ptr<SpmTokenizer> from_directory(const std::string& dir);
  ~SpmTokenizer() override;

  std::vector<std::int64_t> encode(const std::string& text, std::size_t max_length = 0, bool add_special = true) const override;
  std::string decode(const std::vector<std::int64_t>& ids) const override;
  std::int64_t pad_id() const override { return pad_; }
  std::size_t vocab_size() const override { return pieces_; }

 private:
  SpmTokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::int64_t bos_ = -1, eos_ = -1;  // the ids the template adds, -1 = none
  std::int64_t pad_ = -1;
  std::size_t pieces_ = 0;
};

}  // namespace tessera
