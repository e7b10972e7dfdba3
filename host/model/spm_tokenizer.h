// A SentencePiece `.model` file read by libsentencepiece itself, for Hugging Face
// directories that ship `tokenizer.model` (Llama 2, Mistral) or `spiece.model` (T5) and no
// tokenizer.json. SentencePiece does the normalization and segmentation; the template
// around it follows tokenizer_config.json as transformers' slow tokenizers read it:
//   add_bos_token / add_eos_token when given; else T5Tokenizer (or a t5 config.json)
//   appends EOS, LlamaTokenizer (or a llama/mistral config.json) prepends BOS.
// T5's `extra_ids` (default 100) extend the vocabulary past the model's pieces, as
// <extra_id_0> = the last id.
//
// The ids are SentencePiece's own. transformers loads such a directory by converting the
// model to its tokenizer.json pipeline, which parts from SentencePiece on a few inputs:
// on the fixtures' 117 texts, 115 equal for a T5 model and 114 for a Llama one; the rest
// spell special tokens in the text (<s>, </s>: transformers cuts them out, SentencePiece
// reads their characters), start with spaces (Llama) or hold U+0085 (T5). A directory with
// a tokenizer.json is read from that instead (load_tokenizer prefers it).
#pragma once

#include "model/tokenizer.h"

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
  std::size_t vocab_size() const override { return vocab_; }
  bool adds_bos() const { return bos_ >= 0; }
  bool adds_eos() const { return eos_ >= 0; }

 private:
  SpmTokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::int64_t bos_ = -1, eos_ = -1;  // the ids the template adds, -1 = none
  std::int64_t pad_ = -1;
  std::size_t pieces_ = 0, vocab_ = 0;  // the model's pieces; with T5's extra ids
};

}  // namespace tessera
