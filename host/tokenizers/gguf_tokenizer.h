// A GGUF file's own tokenizer (tokenizer.ggml.*), as the tokenizer.json transformers makes
// of it when it reads the file (its GGUF tokenizer converter): byte-level BPE — the file's
// tokens in id order as the vocabulary, its merges in rank order, the GPT-2 split of the
// text, control tokens (token_type 3) as special added tokens, a BOS prepended only when
// tokenizer.ggml.add_bos_token says so. llama.cpp's own pre-tokenizer for a named
// tokenizer.ggml.pre (SmolLM's splits digits one by one) is not applied, as transformers does
// not apply it. Only tokenizer.ggml.model "gpt2" is read; another is refused, naming it.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace tessera {

class GgufFile;

nlohmann::json gguf_tokenizer_json(const GgufFile& f);

}  // namespace tessera
