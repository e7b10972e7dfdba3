#include "tokenizers/tokenizer_steps.h"

#include "tokenizers/precompiled_charsmap.h"
#include "tokenizers/utf8.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <nlohmann/json.hpp>
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <unordered_map>

namespace tessera {

struct TokenizerRegex {
  pcre2_code* code = nullptr;
  ~TokenizerRegex() { pcre2_code_free(code); }
};

namespace {

using Json = nlohmann::json;

// GPT-2's pre-tokenizer pattern (ByteLevel with use_regex).
const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::shared_ptr<const TokenizerRegex> compile(const std::string& pattern, bool literal, const std::string& where) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(), options, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof message);
    throw std::runtime_error(where + ": pattern '" + pattern + "' does not compile at offset " + std::to_string(offset) + ": " +
                             reinterpret_cast<const char*>(message));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional: falls back to the interpreter
  auto r = std::make_shared<TokenizerRegex>();
  r->code = code;
  return r;
}

// The byte ranges of every match of `re` in `s`, in order.
std::vector<std::pair<std::size_t, std::size_t>> find_all(const TokenizerRegex& re, const std::string& s) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(re.code, nullptr);
  std::size_t at = 0;
  while (at <= s.size()) {
    int rc = pcre2_match(re.code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at, 0, md, nullptr);
    if (rc < 0) break;
    PCRE2_SIZE* v = pcre2_get_ovector_pointer(md);
    if (v[1] == v[0]) {  // empty match: step one character on
      at = v[0] + 1;
      while (at < s.size() && (static_cast<unsigned char>(s[at]) & 0xC0) == 0x80) ++at;
      continue;
    }
    out.emplace_back(v[0], v[1]);
    at = v[1];
  }
  pcre2_match_data_free(md);
  return out;
}

// Pieces of `s` cut by the matches, as the Split pre-tokenizer's behaviours do.
std::vector<std::string> split(const std::string& s, const TokenizerRegex& re, const std::string& behavior) {
  std::vector<std::string> out;
  std::size_t last = 0;
  std::string carry;  // merged_with_next: a match waiting for what follows it
  for (auto [b, e] : find_all(re, s)) {
    if (b > last) {
      out.push_back(carry + s.substr(last, b - last));
      carry.clear();
    }
    std::string match = s.substr(b, e - b);
    if (behavior == "isolated") {
      out.push_back(match);
    } else if (behavior == "merged_with_previous") {
      if (!out.empty() && b == last && last > 0) out.back() += match; else out.push_back(match);
    } else if (behavior == "merged_with_next") {
      if (!carry.empty()) out.push_back(carry);
      carry = match;
    }  // removed: dropped
    last = e;
  }
  if (last < s.size()) out.push_back(carry + s.substr(last)), carry.clear();
  if (!carry.empty()) out.push_back(carry);
  return out;
}

// GPT-2's byte ↔ code point table: printable Latin-1 bytes stand for themselves, the other
// 68 bytes for U+0100 onwards, so every byte string is a printable string.
const std::vector<char32_t>& byte_to_char() {
  static const std::vector<char32_t> table = [] {
    std::vector<char32_t> t(256);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[static_cast<std::size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

std::string pattern_of(const Json& step, const std::string& where, bool* literal) {
  const Json& p = step.at("pattern");
  if (p.contains("Regex")) return *literal = false, p["Regex"].get<std::string>();
  if (p.contains("String")) return *literal = true, p["String"].get<std::string>();
  throw std::runtime_error(where + ": pattern is neither Regex nor String");
}

std::string unicode_normalize(const std::string& s, int options) {
  utf8proc_uint8_t* out = nullptr;
  auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str()), static_cast<utf8proc_ssize_t>(s.size()), &out,
                        static_cast<utf8proc_option_t>(options | UTF8PROC_STABLE));
  if (n < 0) return s;  // invalid UTF-8 stays as it came
  std::string r(reinterpret_cast<char*>(out), static_cast<std::size_t>(n));
  std::free(out);
  return r;
}

}  // namespace

std::vector<TokenizerStep> parse_steps(const Json& node, const char* list_key, const std::string& where) {
  std::vector<TokenizerStep> out;
  if (node.is_null()) return out;
  const std::string type = node.value("type", "");
  if (type == "Sequence") {
    for (const auto& n : node.at(list_key)) {
      auto inner = parse_steps(n, list_key, where);
      out.insert(out.end(), inner.begin(), inner.end());
    }
    return out;
  }
  TokenizerStep s;
  s.type = type;
  if (type == "Precompiled") {
    const Json& map = node.value("precompiled_charsmap", Json());
    if (map.is_string() && !map.get<std::string>().empty()) {
      try {
        s.charsmap = std::make_shared<PrecompiledCharsmap>(map.get<std::string>());
      } catch (const std::exception& e) {
        throw std::runtime_error(where + ": " + e.what());
      }
    }
  } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD" || type == "Lowercase" || type == "ByteFallback" ||
             type == "Fuse" || type == "WhitespaceSplit") {
  } else if (type == "Prepend") {
    s.a = node.at("prepend").get<std::string>();
  } else if (type == "Replace") {
    bool literal = true;
    s.a = pattern_of(node, where, &literal);
    s.b = node.at("content").get<std::string>();
    if (!literal) s.regex = compile(s.a, false, where);
  } else if (type == "Split") {
    bool literal = true;
    const std::string pattern = pattern_of(node, where, &literal);  // sets `literal` first
    s.regex = compile(pattern, literal, where);
    std::string b = node.value("behavior", "Isolated");
    std::transform(b.begin(), b.end(), b.begin(), [](unsigned char c) { return std::tolower(c); });
    if (b == "mergedwithprevious") b = "merged_with_previous";
    if (b == "mergedwithnext") b = "merged_with_next";
    if (b != "isolated" && b != "removed" && b != "merged_with_previous" && b != "merged_with_next")
      throw std::runtime_error(where + ": Split behavior '" + node.value("behavior", "") + "' is not supported");
    if (node.value("invert", false)) throw std::runtime_error(where + ": Split with invert is not supported");
    s.behavior = b;
  } else if (type == "ByteLevel") {
    s.flag = node.value("add_prefix_space", false);
    s.use_regex = node.value("use_regex", true);
    if (s.use_regex) s.regex = compile(kGpt2Pattern, false, where);
  } else if (type == "Metaspace") {
    s.a = node.value("replacement", "\u2581");
    s.flag = node.value("split", true);
    s.scheme = node.value("prepend_scheme", node.value("add_prefix_space", true) ? "always" : "never");
  } else if (type == "Digits") {
    s.flag = node.value("individual_digits", false);
    s.regex = compile(s.flag ? R"(\p{N})" : R"(\p{N}+)", false, where);
    s.behavior = "isolated";
  } else if (type == "Strip" && node.contains("strip_right")) {  // the normalizer: Unicode whitespace off either end
    s.start = node.value("strip_left", false);
    s.stop = node.value("strip_right", false);
  } else if (type == "Strip") {  // the decoder: `start`/`stop` copies of `content` off the ends
    s.a = node.value("content", " ");
    s.start = node.value("start", 0);
    s.stop = node.value("stop", 0);
  } else {
    throw std::runtime_error(where + ": step type '" + type + "' is not supported");
  }
  out.push_back(std::move(s));
  return out;
}

std::string run_normalizers(const std::vector<TokenizerStep>& steps, std::string s) {
  for (const auto& n : steps) {
    if (n.type == "Precompiled") {
      if (n.charsmap) s = n.charsmap->normalize(s);
    } else if (n.type == "Strip") {
      const std::u32string t = decode_utf8(s);
      std::size_t b = 0, e = t.size();
      while (n.start && b < e && is_unicode_whitespace(t[b])) ++b;
      while (n.stop && e > b && is_unicode_whitespace(t[e - 1])) --e;
      s.clear();
      for (std::size_t i = b; i < e; ++i) append_utf8(s, t[i]);
    } else if (n.type == "NFC") s = unicode_normalize(s, UTF8PROC_COMPOSE);
    else if (n.type == "NFD") s = unicode_normalize(s, UTF8PROC_DECOMPOSE);
    else if (n.type == "NFKC") s = unicode_normalize(s, UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
    else if (n.type == "NFKD") s = unicode_normalize(s, UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
    else if (n.type == "Lowercase") {
      std::string out;
      for (char32_t c : decode_utf8(s)) append_utf8(out, static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
      s = out;
    } else if (n.type == "Prepend") {
      if (!s.empty()) s = n.a + s;
    } else if (n.type == "Replace") {
      if (!n.regex) {
        s = replace_all(s, n.a, n.b);
      } else {
        std::string out;
        std::size_t last = 0;
        for (auto [b, e] : find_all(*n.regex, s)) out += s.substr(last, b - last) + n.b, last = e;
        s = out + s.substr(last);
      }
    } else {
      throw std::runtime_error("normalizer '" + n.type + "' is not supported");
    }
  }
  return s;
}

std::vector<std::string> run_pre_tokenizers(const std::vector<TokenizerStep>& steps, const std::string& s, bool first_segment) {
  std::vector<std::string> pieces{s};
  for (const auto& p : steps) {
    std::vector<std::string> next;
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      std::string piece = pieces[i];
      if (p.type == "ByteLevel") {
        if (p.flag && (piece.empty() || piece[0] != ' ')) piece = " " + piece;
        std::vector<std::string> parts = p.use_regex ? split(piece, *p.regex, "isolated") : std::vector<std::string>{piece};
        for (const auto& part : parts) {
          std::string mapped;
          for (unsigned char byte : part) append_utf8(mapped, byte_to_char()[byte]);
          next.push_back(mapped);
        }
      } else if (p.type == "Metaspace") {
        if (piece.empty()) continue;  // nothing to mark: a normalizer may have stripped a segment to nothing
        piece = replace_all(piece, " ", p.a);
        const bool prepend = p.scheme == "always" || (p.scheme == "first" && first_segment && i == 0);
        if (prepend && piece.compare(0, p.a.size(), p.a) != 0) piece = p.a + piece;
        if (!p.flag) {
          next.push_back(piece);
          continue;
        }
        std::size_t start = 0;  // split before every replacement character, keeping it
        for (std::size_t at = piece.find(p.a, 1); at != std::string::npos; at = piece.find(p.a, at + 1)) {
          next.push_back(piece.substr(start, at - start));
          start = at;
        }
        next.push_back(piece.substr(start));
      } else if (p.type == "WhitespaceSplit") {
        std::string word;
        for (char32_t c : decode_utf8(piece)) {
          if (is_unicode_whitespace(c)) {
            if (!word.empty()) next.push_back(word), word.clear();
          } else {
            append_utf8(word, c);
          }
        }
        if (!word.empty()) next.push_back(word);
      } else if (p.type == "Split" || p.type == "Digits") {
        for (auto& part : split(piece, *p.regex, p.behavior)) next.push_back(std::move(part));
      } else {
        throw std::runtime_error("pre-tokenizer '" + p.type + "' is not supported");
      }
    }
    pieces = std::move(next);
  }
  pieces.erase(std::remove(pieces.begin(), pieces.end(), std::string()), pieces.end());
  return pieces;
}

std::string run_decoders(const std::vector<TokenizerStep>& steps, std::vector<std::string> tokens) {
  for (const auto& d : steps) {
    if (d.type == "ByteLevel") {
      static const std::unordered_map<char32_t, unsigned char> back = [] {
        std::unordered_map<char32_t, unsigned char> m;
        for (int b = 0; b < 256; ++b) m[byte_to_char()[static_cast<std::size_t>(b)]] = static_cast<unsigned char>(b);
        return m;
      }();
      std::string bytes;
      for (const auto& t : tokens)
        for (char32_t c : decode_utf8(t)) {
          auto it = back.find(c);
          if (it != back.end()) bytes.push_back(static_cast<char>(it->second)); else append_utf8(bytes, c);
        }
      tokens = {valid_utf8(bytes)};
    } else if (d.type == "Replace") {
      for (auto& t : tokens) t = replace_all(t, d.a, d.b);
    } else if (d.type == "ByteFallback") {
      std::vector<std::string> out;
      std::string pending;  // consecutive byte tokens form one UTF-8 string
      std::size_t pending_count = 0;
      auto flush = [&] {
        if (pending_count == 0) return;
        const std::string valid = valid_utf8(pending);
        if (valid == pending) {
          out.push_back(pending);
        } else {
          std::string replacement;
          for (std::size_t i = 0; i < pending_count; ++i) replacement += "\uFFFD";
          out.push_back(replacement);
        }
        pending.clear(), pending_count = 0;
      };
      for (const auto& t : tokens) {
        unsigned value = 0;
        if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::sscanf(t.c_str() + 3, "%2X", &value) == 1) {
          pending.push_back(static_cast<char>(value)), ++pending_count;
        } else {
          flush();
          out.push_back(t);
        }
      }
      flush();
      tokens = out;
    } else if (d.type == "Fuse") {
      std::string all;
      for (const auto& t : tokens) all += t;
      tokens = {all};
    } else if (d.type == "Strip") {
      for (auto& t : tokens) {
        for (std::int64_t k = 0; k < d.start && t.compare(0, d.a.size(), d.a) == 0; ++k) t.erase(0, d.a.size());
        for (std::int64_t k = 0; k < d.stop && t.size() >= d.a.size() && t.compare(t.size() - d.a.size(), d.a.size(), d.a) == 0; ++k)
          t.erase(t.size() - d.a.size());
      }
    } else if (d.type == "Metaspace") {
      // As `tokenizers` does: in the first token the replacement character is dropped
      // (it stood for the prepended space), elsewhere it becomes a space.
      for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = replace_all(tokens[i], d.a, i == 0 && d.scheme != "never" ? "" : " ");
    } else {
      throw std::runtime_error("decoder '" + d.type + "' is not supported");
    }
  }
  std::string text;
  for (const auto& t : tokens) text += t;
  return text;
}

}  // namespace tessera
