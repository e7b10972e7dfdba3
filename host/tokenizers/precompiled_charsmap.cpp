#include "tokenizers/precompiled_charsmap.h"

#include <utf8proc.h>

#include <stdexcept>

namespace tessera {
namespace {

std::string decode_base64(const std::string& in) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  std::uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=') break;
    const int v = value(c);
    if (v < 0) throw std::runtime_error(std::string("Precompiled charsmap is not base64 (character '") + c + "')");
    acc = (acc << 6) | static_cast<std::uint32_t>(v);
    bits += 6;
    if (bits >= 8) bits -= 8, out.push_back(static_cast<char>((acc >> bits) & 0xFF));
  }
  return out;
}

// Darts-clone's unit layout.
bool has_leaf(std::uint32_t unit) { return ((unit >> 8) & 1) == 1; }
std::uint32_t value(std::uint32_t unit) { return unit & ((1u << 31) - 1); }
std::uint32_t label(std::uint32_t unit) { return unit & ((1u << 31) | 0xFF); }
std::uint32_t offset(std::uint32_t unit) { return (unit >> 10) << ((unit & (1u << 9)) >> 6); }

}  // namespace

PrecompiledCharsmap::PrecompiledCharsmap(const std::string& base64) {
  const std::string blob = decode_base64(base64);
  if (blob.size() < 4) throw std::runtime_error("Precompiled charsmap is shorter than its 4-byte header");
  const auto* b = reinterpret_cast<const unsigned char*>(blob.data());
  const std::uint32_t trie_bytes = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<std::uint32_t>(b[3]) << 24);
  if (trie_bytes % 4 != 0 || trie_bytes == 0 || 4 + static_cast<std::size_t>(trie_bytes) > blob.size())
    throw std::runtime_error("Precompiled charsmap: trie of " + std::to_string(trie_bytes) + " bytes does not fit a blob of " +
                             std::to_string(blob.size()));
  trie_.resize(trie_bytes / 4);
  for (std::size_t i = 0; i < trie_.size(); ++i) {
    const unsigned char* u = b + 4 + 4 * i;
    trie_[i] = u[0] | (u[1] << 8) | (u[2] << 16) | (static_cast<std::uint32_t>(u[3]) << 24);
  }
  normalized_ = blob.substr(4 + trie_bytes);
}

std::optional<std::string_view> PrecompiledCharsmap::lookup(std::string_view chunk) const {
  std::size_t node = offset(trie_[0]);
  for (unsigned char c : chunk) {
    if (c == 0) break;
    node ^= c;
    if (node >= trie_.size()) return std::nullopt;  // a malformed trie ends the walk rather than reading past it
    const std::uint32_t unit = trie_[node];
    if (label(unit) != c) return std::nullopt;
    node ^= offset(unit);
    if (node >= trie_.size()) return std::nullopt;
    if (has_leaf(unit)) {
      const std::size_t at = value(trie_[node]);
      if (at >= normalized_.size()) return std::nullopt;
      const std::size_t end = normalized_.find('\0', at);
      return std::string_view(normalized_).substr(at, (end == std::string::npos ? normalized_.size() : end) - at);
    }
  }
  return std::nullopt;
}

std::string PrecompiledCharsmap::normalize(const std::string& text) const {
  // Cut `text` into extended grapheme clusters: (start byte, end byte, code point starts).
  std::string out;
  out.reserve(text.size());
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
  const auto n = static_cast<utf8proc_ssize_t>(text.size());
  std::vector<std::size_t> starts;  // code point starts of the cluster being gathered
  utf8proc_int32_t state = 0, prev = -1;
  auto flush = [&](std::size_t end) {
    if (starts.empty()) return;
    const std::string_view cluster(text.data() + starts.front(), end - starts.front());
    const auto whole = cluster.size() < 6 ? lookup(cluster) : std::nullopt;
    if (whole) {
      out.append(*whole);
      starts.clear();
      return;
    }
    for (std::size_t i = 0; i < starts.size(); ++i) {
      const std::size_t stop = i + 1 < starts.size() ? starts[i + 1] : end;
      const std::string_view cp(text.data() + starts[i], stop - starts[i]);
      if (auto r = lookup(cp)) out.append(*r);
      else out.append(cp);
    }
    starts.clear();
  };
  for (utf8proc_ssize_t at = 0; at < n;) {
    utf8proc_int32_t cp = 0;
    utf8proc_ssize_t len = utf8proc_iterate(p + at, n - at, &cp);
    if (len <= 0) cp = 0xFFFD, len = 1;  // an invalid byte is a cluster of its own
    if (prev >= 0 && (cp == 0xFFFD || utf8proc_grapheme_break_stateful(prev, cp, &state))) flush(static_cast<std::size_t>(at));
    starts.push_back(static_cast<std::size_t>(at));
    prev = cp;
    at += len;
  }
  flush(text.size());
  return out;
}

}  // namespace tessera
