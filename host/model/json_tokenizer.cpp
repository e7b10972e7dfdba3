#include "model/json_tokenizer.h"

#include "model/precompiled_charsmap.h"
#include "model/utf8.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <nlohmann/json.hpp>
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <stdexcept>

namespace tessera {

struct JsonTokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() { pcre2_code_free(code); }
};

namespace {

using Json = nlohmann::json;
using Step = JsonTokenizer::Step;

// GPT-2's pre-tokenizer pattern (ByteLevel with use_regex).
const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::shared_ptr<const JsonTokenizer::Regex> compile(const std::string& pattern, bool literal, const std::string& where) {
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
  auto r = std::make_shared<JsonTokenizer::Regex>();
  r->code = code;
  return r;
}

// The byte ranges of every match of `re` in `s`, in order.
std::vector<std::pair<std::size_t, std::size_t>> find_all(const JsonTokenizer::Regex& re, const std::string& s) {
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
std::vector<std::string> split(const std::string& s, const JsonTokenizer::Regex& re, const std::string& behavior) {
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

std::vector<Step> parse_steps(const Json& node, const char* list_key, const std::string& where) {
  std::vector<Step> out;
  if (node.is_null()) return out;
  const std::string type = node.value("type", "");
  if (type == "Sequence") {
    for (const auto& n : node.at(list_key)) {
      auto inner = parse_steps(n, list_key, where);
      out.insert(out.end(), inner.begin(), inner.end());
    }
    return out;
  }
  Step s;
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

JsonTokenizer::~JsonTokenizer() = default;

JsonTokenizer::JsonTokenizer(const Json& j, const std::string& path) {
  const Json& m = j.at("model");
  unigram_ = m.value("type", "") == "Unigram";
  if (unigram_) {
    // vocab: [[piece, log probability], …] in id order
    for (const auto& entry : m.at("vocab")) {
      const auto id = static_cast<std::int64_t>(scores_.size());
      const std::string piece = entry.at(0).get<std::string>();
      vocab_[piece] = id;
      scores_.push_back(entry.at(1).get<double>());
      max_piece_chars_ = std::max(max_piece_chars_, decode_utf8(piece).size());
    }
    min_score_ = scores_.empty() ? 0 : *std::min_element(scores_.begin(), scores_.end());
    if (m.contains("unk_id") && m["unk_id"].is_number_integer()) unk_id_ = m["unk_id"].get<std::int64_t>();
    fuse_unk_ = true;  // SentencePiece always fuses unknown runs
  } else {
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(key) && !m[key].is_null() && !m[key].get<std::string>().empty())
        throw std::runtime_error(path + ": BPE with " + key + " is not supported");
    for (auto it = m.at("vocab").begin(); it != m.at("vocab").end(); ++it) vocab_[it.key()] = it.value().get<std::int64_t>();
    std::int64_t rank = 0;
    for (const auto& merge : m.at("merges")) {
      std::string a, b;
      if (merge.is_array()) {
        a = merge.at(0).get<std::string>(), b = merge.at(1).get<std::string>();
      } else {
        const std::string s = merge.get<std::string>();
        const auto space = s.find(' ', 1);
        if (space == std::string::npos) throw std::runtime_error(path + ": merge '" + s + "' is not two tokens");
        a = s.substr(0, space), b = s.substr(space + 1);
      }
      auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end())
        throw std::runtime_error(path + ": merge '" + a + " " + b + "' uses a token missing from the vocabulary");
      const auto key = (static_cast<std::uint64_t>(ia->second) << 32) | static_cast<std::uint64_t>(ib->second);
      merges_.emplace(key, std::make_pair(rank++, iab->second));
    }
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      auto it = vocab_.find(m["unk_token"].get<std::string>());
      if (it == vocab_.end()) throw std::runtime_error(path + ": unk_token '" + m["unk_token"].get<std::string>() + "' is not in the vocabulary");
      unk_id_ = it->second;
    }
    fuse_unk_ = m.value("fuse_unk", false);
    ignore_merges_ = m.value("ignore_merges", false);
  }
  byte_fallback_ = m.value("byte_fallback", false);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = vocab_.find(name);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }
  std::int64_t size = 0;
  for (const auto& [t, id] : vocab_) size = std::max(size, id + 1);
  for (const auto& a : j.value("added_tokens", Json::array())) size = std::max(size, a.at("id").get<std::int64_t>() + 1);
  id_to_token_.resize(static_cast<std::size_t>(size));
  special_.assign(static_cast<std::size_t>(size), false);
  for (const auto& [t, id] : vocab_) id_to_token_[static_cast<std::size_t>(id)] = t;
  for (const auto& a : j.value("added_tokens", Json::array())) {
    Added t{a.at("content").get<std::string>(), a.at("id").get<std::int64_t>(), a.value("special", false), a.value("lstrip", false),
            a.value("rstrip", false)};
    id_to_token_[static_cast<std::size_t>(t.id)] = t.content;
    special_[static_cast<std::size_t>(t.id)] = t.special;
    added_.push_back(t);
  }
  std::stable_sort(added_.begin(), added_.end(), [](const Added& x, const Added& y) { return x.content.size() > y.content.size(); });

  const std::string where = path;
  normalizers_ = parse_steps(j.value("normalizer", Json()), "normalizers", where + " (normalizer)");
  pre_tokenizers_ = parse_steps(j.value("pre_tokenizer", Json()), "pretokenizers", where + " (pre_tokenizer)");
  decoders_ = parse_steps(j.value("decoder", Json()), "decoders", where + " (decoder)");

  // The post-processor's template for one sequence.
  std::vector<Json> processors;
  const Json post = j.value("post_processor", Json());
  if (post.is_object() && post.value("type", "") == "Sequence") {
    for (const auto& p : post.at("processors")) processors.push_back(p);
  } else if (post.is_object()) {
    processors.push_back(post);
  }
  for (const auto& p : processors) {
    const std::string type = p.value("type", "");
    if (type == "ByteLevel") continue;  // offsets only
    if (type == "RobertaProcessing" || type == "BertProcessing") {
      template_.before = {p.at("cls").at(1).get<std::int64_t>()};
      template_.after = {p.at("sep").at(1).get<std::int64_t>()};
    } else if (type == "TemplateProcessing") {
      bool seen_sequence = false;
      for (const auto& item : p.at("single")) {
        if (item.contains("Sequence")) {
          seen_sequence = true;
          continue;
        }
        const std::string name = item.at("SpecialToken").at("id").get<std::string>();
        for (const auto& id : p.at("special_tokens").at(name).at("ids")) (seen_sequence ? template_.after : template_.before).push_back(id.get<std::int64_t>());
      }
    } else {
      throw std::runtime_error(path + ": post_processor '" + type + "' is not supported");
    }
  }
  if (j.contains("padding") && j["padding"].is_object()) pad_id_ = j["padding"].value("pad_id", pad_id_);
}

std::string JsonTokenizer::normalize(std::string s) const {
  for (const auto& n : normalizers_) {
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

std::vector<std::string> JsonTokenizer::pre_tokenize(const std::string& s, bool first_segment) const {
  std::vector<std::string> pieces{s};
  for (const auto& p : pre_tokenizers_) {
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

void JsonTokenizer::unknown(const std::string& ch, std::vector<std::int64_t>& sym, std::vector<bool>& frozen, bool& last_unk) const {
  bool bytes_ok = byte_fallback_;
  for (unsigned char b : ch) bytes_ok = bytes_ok && byte_ids_[b] >= 0;
  if (bytes_ok) {
    for (unsigned char b : ch) sym.push_back(byte_ids_[b]), frozen.push_back(true);
    last_unk = false;
  } else if (unk_id_ >= 0) {
    if (!(fuse_unk_ && last_unk)) sym.push_back(unk_id_), frozen.push_back(true);
    last_unk = true;
  }
}

void JsonTokenizer::unigram(const std::string& piece, std::vector<std::int64_t>& out) const {
  // Viterbi over the lattice of vocabulary pieces: best[i] is the highest total score of a
  // segmentation of the first i characters. A character no single-character piece covers
  // is an unknown node scoring min − 10 (SentencePiece's kUnkPenalty).
  const std::u32string text = decode_utf8(piece);
  const std::size_t n = text.size();
  const double lowest = -std::numeric_limits<double>::infinity();
  std::vector<double> best(n + 1, lowest);
  std::vector<std::int64_t> from(n + 1, -1), id_at(n + 1, -1);  // id -1: unknown character
  best[0] = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (best[i] == lowest) continue;
    std::string sub;
    bool single = false;
    for (std::size_t len = 1; len <= max_piece_chars_ && i + len <= n; ++len) {
      append_utf8(sub, text[i + len - 1]);
      auto it = vocab_.find(sub);
      if (it == vocab_.end()) continue;
      single = single || len == 1;
      const double score = best[i] + scores_[static_cast<std::size_t>(it->second)];
      if (score > best[i + len]) best[i + len] = score, from[i + len] = static_cast<std::int64_t>(i), id_at[i + len] = it->second;
    }
    if (!single) {
      const double score = best[i] + min_score_ - 10.0;
      if (score > best[i + 1]) best[i + 1] = score, from[i + 1] = static_cast<std::int64_t>(i), id_at[i + 1] = -1;
    }
  }
  std::vector<std::pair<std::size_t, std::int64_t>> path;  // (start character, id)
  for (std::size_t at = n; at > 0; at = static_cast<std::size_t>(from[at])) path.emplace_back(static_cast<std::size_t>(from[at]), id_at[at]);
  std::vector<std::int64_t> sym;
  std::vector<bool> frozen;
  bool last_unk = false;
  for (auto it = path.rbegin(); it != path.rend(); ++it) {
    if (it->second >= 0) {
      sym.push_back(it->second), frozen.push_back(false), last_unk = false;
    } else {
      std::string ch;
      append_utf8(ch, text[it->first]);
      unknown(ch, sym, frozen, last_unk);
    }
  }
  out.insert(out.end(), sym.begin(), sym.end());
}

void JsonTokenizer::bpe(const std::string& piece, std::vector<std::int64_t>& out) const {
  if (ignore_merges_) {
    auto it = vocab_.find(piece);
    if (it != vocab_.end()) return out.push_back(it->second);
  }
  // Symbols: one per character; characters missing from the vocabulary become byte
  // tokens (byte fallback) or the unknown token, consecutive unknowns fused if asked.
  std::vector<std::int64_t> sym;
  std::vector<bool> frozen;  // byte-fallback and unknown symbols never merge
  bool last_unk = false;
  for (char32_t c : decode_utf8(piece)) {
    std::string ch;
    append_utf8(ch, c);
    auto it = vocab_.find(ch);
    if (it != vocab_.end()) {
      sym.push_back(it->second), frozen.push_back(false), last_unk = false;
      continue;
    }
    unknown(ch, sym, frozen, last_unk);
  }
  // Merge the adjacent pair of lowest rank, leftmost first, until none applies.
  for (;;) {
    std::int64_t best = std::numeric_limits<std::int64_t>::max(), merged = -1;
    std::size_t at = 0;
    for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
      if (frozen[i] || frozen[i + 1]) continue;
      auto it = merges_.find((static_cast<std::uint64_t>(sym[i]) << 32) | static_cast<std::uint64_t>(sym[i + 1]));
      if (it != merges_.end() && it->second.first < best) best = it->second.first, merged = it->second.second, at = i;
    }
    if (merged < 0) break;
    sym[at] = merged;
    sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    frozen.erase(frozen.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  out.insert(out.end(), sym.begin(), sym.end());
}

std::vector<std::int64_t> JsonTokenizer::ids_of(const std::string& text) const {
  std::vector<std::int64_t> ids;
  std::size_t start = 0;  // beginning of the text not yet tokenized
  bool first = true;
  auto model = [&](std::string segment) {
    if (segment.empty()) return;
    for (const auto& piece : pre_tokenize(normalize(segment), first)) unigram_ ? unigram(piece, ids) : bpe(piece, ids);
  };
  std::size_t at = 0;
  while (at < text.size()) {
    const Added* hit = nullptr;
    for (const auto& a : added_)  // longest first
      if (!a.content.empty() && text.compare(at, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    if (hit == nullptr) {
      ++at;
      continue;
    }
    std::size_t seg_end = at, next = at + hit->content.size();
    if (hit->lstrip)
      while (seg_end > start && std::isspace(static_cast<unsigned char>(text[seg_end - 1]))) --seg_end;
    if (hit->rstrip)
      while (next < text.size() && std::isspace(static_cast<unsigned char>(text[next]))) ++next;
    model(text.substr(start, seg_end - start));
    first = false;
    ids.push_back(hit->id);
    start = at = next;
  }
  model(text.substr(start));
  return ids;
}

std::vector<std::int64_t> JsonTokenizer::encode(const std::string& text, std::size_t max_length, bool add_special) const {
  std::vector<std::int64_t> body = ids_of(text);
  const std::vector<std::int64_t> none;
  const auto& before = add_special ? template_.before : none;
  const auto& after = add_special ? template_.after : none;
  const std::size_t extra = before.size() + after.size();
  if (max_length > 0 && body.size() + extra > max_length) body.resize(max_length > extra ? max_length - extra : 0);
  std::vector<std::int64_t> ids(before);
  ids.insert(ids.end(), body.begin(), body.end());
  ids.insert(ids.end(), after.begin(), after.end());
  return ids;
}

std::string JsonTokenizer::decode(const std::vector<std::int64_t>& ids) const {
  std::vector<std::string> tokens;
  for (auto id : ids) {
    if (id < 0 || static_cast<std::size_t>(id) >= id_to_token_.size()) throw std::runtime_error("token id " + std::to_string(id) + " is outside the vocabulary");
    if (!special_[static_cast<std::size_t>(id)]) tokens.push_back(id_to_token_[static_cast<std::size_t>(id)]);
  }
  for (const auto& d : decoders_) {
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
