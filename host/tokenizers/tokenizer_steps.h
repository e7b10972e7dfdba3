// The steps of a Hugging Face tokenizer.json pipeline around its model, as the
// `tokenizers` library runs them (json_tokenizer.h lists the whole pipeline):
//   normalizers      NFC/NFD/NFKC/NFKD, Lowercase, Prepend, Replace, Strip, and
//                    SentencePiece's Precompiled charsmap (precompiled_charsmap.h);
//   pre-tokenizers   Split by a regex (PCRE2 with Unicode properties runs the file's own
//                    pattern), ByteLevel (GPT-2's regex, bytes as printable code points),
//                    Metaspace, WhitespaceSplit, Digits;
//   decoders         ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace.
// A Sequence is flattened into its steps; an unknown step type is refused naming it.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

class PrecompiledCharsmap;
struct TokenizerRegex;  // a compiled PCRE2 pattern

struct TokenizerStep {  // one normalizer, pre-tokenizer or decoder step, as the file names it
  std::string type;
  std::string a, b;                             // Prepend/Replace/Metaspace/Strip strings
  std::shared_ptr<const TokenizerRegex> regex;  // Split, Replace with a Regex pattern
  std::string behavior;                         // Split: isolated | removed | merged_with_previous | merged_with_next
  bool flag = false;                            // ByteLevel add_prefix_space, Metaspace split, Digits individual_digits
  bool use_regex = true;                        // ByteLevel
  std::string scheme = "always";                // Metaspace prepend_scheme
  std::int64_t start = 0, stop = 0;             // Strip: decoder counts; normalizer left/right flags
  std::shared_ptr<const PrecompiledCharsmap> charsmap;  // Precompiled (none: a no-op)
};

// The steps of one pipeline stage (`node`: the file's "normalizer", "pre_tokenizer" or
// "decoder"; `list_key`: its Sequence's list). Errors start with `where`.
std::vector<TokenizerStep> parse_steps(const nlohmann::json& node, const char* list_key, const std::string& where);

std::string run_normalizers(const std::vector<TokenizerStep>& steps, std::string s);
// first_segment: the text before any added token (Metaspace's prepend_scheme "first").
std::vector<std::string> run_pre_tokenizers(const std::vector<TokenizerStep>& steps, const std::string& s, bool first_segment);
// The tokens' strings through the decoder chain, joined.
std::string run_decoders(const std::vector<TokenizerStep>& steps, std::vector<std::string> tokens);

}  // namespace tessera
