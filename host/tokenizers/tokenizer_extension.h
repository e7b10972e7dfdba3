// The run's tokenizer offered to methods as the tessera.host.tokenizer extension (version 2:
// ids without and with the model's special tokens). Whoever loads a tokenizer and attaches
// methods (a training session, `tessera generate`) offers one, so a prompt initialised from
// text attaches the same way everywhere.
#pragma once

#include "tokenizers/tokenizer.h"

#include <tessera/extensions.h>

namespace tessera {

class TokenizerExtension {
 public:
  explicit TokenizerExtension(const Tokenizer& tokenizer)
      : table_{{sizeof(tessera_host_tokenizer_v2), 2}, const_cast<Tokenizer*>(&tokenizer),
               [](void* t, const std::string& text) { return static_cast<const Tokenizer*>(t)->encode(text, 0, false); },
               [](void* t, const std::string& text) { return static_cast<const Tokenizer*>(t)->encode(text, 0, true); }} {}
  TokenizerExtension(const TokenizerExtension&) = delete;
  TokenizerExtension& operator=(const TokenizerExtension&) = delete;

  const void* table() const { return &table_; }

 private:
  tessera_host_tokenizer_v2 table_;
};

}  // namespace tessera
