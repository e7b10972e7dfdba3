// Tokenizers, read from a Hugging Face directory and equal to the `tokenizers` library id
// for id: WordPiece (BERT), BPE, byte-level (GPT-2, RoBERTa, Llama 3, Qwen2) or
// SentencePiece-style with byte fallback (Llama 2, Mistral, TinyLlama), and Unigram (T5).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Token ids with the special tokens the model's template adds (CLS/SEP, BOS …); at most
  // max_length ids (0 = no limit), the text truncated from its end like `truncation=True`.
  virtual std::vector<std::int64_t> encode(const std::string& text, std::size_t max_length = 0, bool add_special = true) const = 0;
  // Text of the ids, special tokens left out.
  virtual std::string decode(const std::vector<std::int64_t>& ids) const = 0;
  virtual std::int64_t pad_id() const = 0;  // -1 when the tokenizer has none
  virtual std::size_t vocab_size() const = 0;
};

// tokenizer.json (WordPiece, BPE or Unigram model), else a SentencePiece tokenizer.model or
// spiece.model (T5 and Llama classes: the pipeline transformers builds from it,
// spm_convert.h; other classes: libsentencepiece, spm_tokenizer.h), else vocab.txt
// (WordPiece). Anything else is refused naming the file and what it holds.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir);

}  // namespace tessera
