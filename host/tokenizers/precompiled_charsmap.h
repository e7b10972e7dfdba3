// SentencePiece's compiled normalization rules (the `precompiled_charsmap` of a
// `.model`'s normalizer spec, base64 in tokenizer.json's "Precompiled" normalizer: T5,
// mT5, ALBERT, XLM-R). The blob is
//
//   u32 LE  trie size in bytes
//   u32[]   a Darts double-array trie over UTF-8 bytes; a key's value is an offset into
//   char[]  the normalized strings, each NUL-terminated.
//
// Normalizing walks the text by extended grapheme cluster (UAX #29) as the `tokenizers`
// library does: a cluster under 6 bytes whose bytes start with a key is replaced by that
// key's string as a whole; otherwise each code point is looked up alone and kept when no
// key starts it. Lookup takes the *shortest* key that prefixes the chunk — what
// `tokenizers` does, kept for id-for-id equality.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tessera {

class PrecompiledCharsmap {
 public:
  // base64: the charsmap as tokenizer.json stores it. Throws with the reason when the blob
  // is not base64 or its trie does not fit.
  explicit PrecompiledCharsmap(const std::string& base64);

  std::string normalize(const std::string& text) const;

 private:
  // The replacement for the shortest key prefixing `chunk`, if any.
  std::optional<std::string_view> lookup(std::string_view chunk) const;

  std::vector<std::uint32_t> trie_;
  std::string normalized_;
};

}  // namespace tessera
