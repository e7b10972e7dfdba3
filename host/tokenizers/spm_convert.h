// A directory whose tokenizer is a SentencePiece `.model` alone (T5 v1.1's spiece.model,
// Llama-family tokenizer.model) read as transformers reads it: transformers turns the
// model into a `tokenizers` pipeline built by the tokenizer class, and JsonTokenizer runs
// that pipeline id for id. The two classes our architectures use:
//
//   T5Tokenizer     Unigram over the pieces and scores; the model's Precompiled charsmap;
//                   WhitespaceSplit + Metaspace (prepend always); "$A </s>"; extra ids
//                   <extra_id_i> = pieces + extra_ids − 1 − i (extra_ids, default 100).
//   LlamaTokenizer  BPE with byte fallback over the pieces, merges made from the vocabulary
//                   (every split of a piece into two pieces, ranked by the piece's id, then
//                   by the left part's length); Metaspace with prepend scheme first (always
//                   with legacy = true, never with add_prefix_space = false); BOS/EOS as
//                   add_bos_token / add_eos_token say (Mistral directories use this class).
//
// Control and user-defined pieces, the named special tokens (bos/eos/unk/pad of
// tokenizer_config.json) and T5's extra ids are added tokens, cut out of the text before
// the model runs, so "<extra_id_0>" or "</s>" written in a text are those tokens.
//
// Where transformers 5 and its own documentation part, the documented, trained behaviour
// is kept: a Llama directory whose tokenizer_config.json does not say add_bos_token gets
// BOS (the class's documented default; transformers 5 adds none), and a directory with a
// llama/mistral/t5 config.json but no tokenizer_class is read with that class.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <optional>
#include <string>

namespace tessera {

// The tokenizer.json pipeline for `dir`'s tokenizer.model / spiece.model, or nullopt when
// its class is neither of the above (load_tokenizer then runs libsentencepiece). Errors name
// the file and the reason.
std::optional<nlohmann::json> spm_tokenizer_json(const std::string& dir);

}  // namespace tessera
