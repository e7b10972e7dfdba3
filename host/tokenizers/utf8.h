// UTF-8 <-> code points for the tokenizers (utf8proc does the decoding).
#pragma once

#include <string>

namespace tessera {

// Invalid bytes become U+FFFD, one per byte.
std::u32string decode_utf8(const std::string& s);
void append_utf8(std::string& out, char32_t cp);
// `s` with every invalid byte replaced by U+FFFD (decoded byte tokens may not be UTF-8).
std::string valid_utf8(const std::string& s);
// Unicode's White_Space property (what Rust's char::is_whitespace tests).
bool is_unicode_whitespace(char32_t c);

}  // namespace tessera
