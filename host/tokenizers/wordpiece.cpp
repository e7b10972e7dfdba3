#include "tokenizers/wordpiece.h"

#include "formats/json_file.h"
#include "tokenizers/utf8.h"

#include <nlohmann/json.hpp>
#include <utf8proc.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace tessera {
namespace {

namespace fs = std::filesystem;

utf8proc_category_t category(char32_t c) { return utf8proc_category(static_cast<utf8proc_int32_t>(c)); }

// Rust's char::is_whitespace (the White_Space property), which `tokenizers` uses.
bool is_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool is_control(char32_t c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  auto k = category(c);
  return k == UTF8PROC_CATEGORY_CC || k == UTF8PROC_CATEGORY_CF || k == UTF8PROC_CATEGORY_CN ||
         k == UTF8PROC_CATEGORY_CO || k == UTF8PROC_CATEGORY_CS;
}

bool is_punctuation(char32_t c) {
  if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126)) return true;
  auto k = category(c);
  return k >= UTF8PROC_CATEGORY_PC && k <= UTF8PROC_CATEGORY_PO;
}

bool is_chinese(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + p.string());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

WordPieceTokenizer WordPieceTokenizer::from_directory(const std::string& dir) {
  WordPieceTokenizer t;
  fs::path root(dir);
  std::string unk = "[UNK]", cls = "[CLS]", sep = "[SEP]", pad = "[PAD]";
  if (fs::exists(root / "tokenizer.json")) {
    const auto j = read_json_file((root / "tokenizer.json").string());
    const auto& model = j.at("model");
    if (model.value("type", "") != "WordPiece")
      throw std::runtime_error(dir + "/tokenizer.json: model type '" + model.value("type", "?") + "' is not WordPiece");
    for (auto it = model.at("vocab").begin(); it != model.at("vocab").end(); ++it) t.vocab_[it.key()] = it.value().get<std::int64_t>();
    unk = model.value("unk_token", unk);
    t.prefix_ = model.value("continuing_subword_prefix", t.prefix_);
    t.max_chars_per_word_ = model.value("max_input_chars_per_word", t.max_chars_per_word_);
    if (j.contains("normalizer") && j["normalizer"].is_object() && j["normalizer"].value("type", "") == "BertNormalizer") {
      const auto& n = j["normalizer"];
      t.lowercase_ = n.value("lowercase", true);
      t.clean_text_ = n.value("clean_text", true);
      t.chinese_chars_ = n.value("handle_chinese_chars", true);
      // null strip_accents means "follow lowercase", as in BERT's original tokenizer.
      t.strip_accents_ = n.contains("strip_accents") && !n["strip_accents"].is_null() ? n["strip_accents"].get<bool>() : t.lowercase_;
    }
    if (j.contains("post_processor") && j["post_processor"].is_object() && j["post_processor"].value("type", "") == "BertProcessing") {
      cls = j["post_processor"]["cls"][0].get<std::string>();
      sep = j["post_processor"]["sep"][0].get<std::string>();
    }
    if (j.contains("padding") && j["padding"].is_object()) pad = j["padding"].value("pad_token", pad);
  } else if (fs::exists(root / "vocab.txt")) {
    std::istringstream lines(read_text(root / "vocab.txt"));
    std::string line;
    std::int64_t id = 0;
    while (std::getline(lines, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      t.vocab_.emplace(line, id++);
    }
    if (fs::exists(root / "tokenizer_config.json")) {
      const auto c = read_json_file((root / "tokenizer_config.json").string());
      t.lowercase_ = c.value("do_lower_case", true);
      t.strip_accents_ = c.contains("strip_accents") && !c["strip_accents"].is_null() ? c["strip_accents"].get<bool>() : t.lowercase_;
    }
  } else {
    throw std::runtime_error(dir + ": neither tokenizer.json nor vocab.txt found");
  }
  auto id_of = [&](const std::string& tok) {
    auto it = t.vocab_.find(tok);
    if (it == t.vocab_.end()) throw std::runtime_error(dir + ": special token " + tok + " is not in the vocabulary");
    return it->second;
  };
  t.unk_id_ = id_of(unk);
  t.cls_id_ = id_of(cls);
  t.sep_id_ = id_of(sep);
  t.pad_id_ = id_of(pad);
  for (const auto& [tok, id] : t.vocab_) {
    if (id < 0) throw std::runtime_error(dir + ": negative id for token " + tok);
    if (static_cast<std::size_t>(id) >= t.id_to_token_.size()) t.id_to_token_.resize(static_cast<std::size_t>(id) + 1);
    t.id_to_token_[static_cast<std::size_t>(id)] = tok;
  }
  return t;
}

std::u32string WordPieceTokenizer::normalize(const std::string& text) const {
  std::u32string s = decode_utf8(text), out;
  out.reserve(s.size());
  for (char32_t c : s) {
    if (clean_text_) {
      if (c == 0 || c == 0xFFFD || is_control(c)) continue;
      if (is_whitespace(c)) c = ' ';
    }
    if (chinese_chars_ && is_chinese(c)) {
      out += U' ';
      out += c;
      out += U' ';
    } else {
      out += c;
    }
  }
  if (strip_accents_) {
    std::string utf8;
    for (char32_t c : out) append_utf8(utf8, c);
    utf8proc_uint8_t* nfd = utf8proc_NFD(reinterpret_cast<const utf8proc_uint8_t*>(utf8.c_str()));
    std::u32string decomposed = decode_utf8(reinterpret_cast<const char*>(nfd));
    std::free(nfd);
    out.clear();
    for (char32_t c : decomposed)
      if (category(c) != UTF8PROC_CATEGORY_MN) out += c;
  }
  if (lowercase_)
    for (char32_t& c : out) c = static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
  return out;
}

void WordPieceTokenizer::word_pieces(const std::u32string& word, std::vector<std::int64_t>& ids, std::vector<std::string>* pieces) const {
  if (word.size() > max_chars_per_word_) {
    ids.push_back(unk_id_);
    if (pieces) pieces->push_back("[UNK]");
    return;
  }
  std::vector<std::int64_t> found;
  std::vector<std::string> found_pieces;
  std::size_t start = 0;
  while (start < word.size()) {
    std::size_t end = word.size();
    bool matched = false;
    while (start < end) {
      std::string piece = start > 0 ? prefix_ : std::string();
      for (std::size_t i = start; i < end; ++i) append_utf8(piece, word[i]);
      auto it = vocab_.find(piece);
      if (it != vocab_.end()) {
        found.push_back(it->second);
        found_pieces.push_back(std::move(piece));
        matched = true;
        break;
      }
      --end;
    }
    if (!matched) {  // one unknown piece makes the whole word unknown
      ids.push_back(unk_id_);
      if (pieces) pieces->push_back("[UNK]");
      return;
    }
    start = end;
  }
  ids.insert(ids.end(), found.begin(), found.end());
  if (pieces) pieces->insert(pieces->end(), found_pieces.begin(), found_pieces.end());
}

std::vector<std::int64_t> WordPieceTokenizer::ids_of(const std::string& text, std::vector<std::string>* pieces) const {
  std::u32string s = normalize(text), word;
  std::vector<std::int64_t> ids;
  auto flush = [&] {
    if (!word.empty()) word_pieces(word, ids, pieces);
    word.clear();
  };
  for (char32_t c : s) {
    if (is_whitespace(c)) {
      flush();
    } else if (is_punctuation(c)) {
      flush();
      word_pieces(std::u32string(1, c), ids, pieces);
    } else {
      word += c;
    }
  }
  flush();
  return ids;
}

std::vector<std::string> WordPieceTokenizer::tokenize(const std::string& text) const {
  std::vector<std::string> pieces;
  ids_of(text, &pieces);
  return pieces;
}

std::vector<std::int64_t> WordPieceTokenizer::encode(const std::string& text, std::size_t max_length, bool add_special) const {
  std::vector<std::int64_t> body = ids_of(text, nullptr);
  const std::size_t extra = add_special ? 2 : 0;
  if (max_length > extra && body.size() > max_length - extra) body.resize(max_length - extra);
  if (!add_special) return body;
  std::vector<std::int64_t> ids;
  ids.reserve(body.size() + 2);
  ids.push_back(cls_id_);
  ids.insert(ids.end(), body.begin(), body.end());
  ids.push_back(sep_id_);
  return ids;
}

std::string WordPieceTokenizer::decode(const std::vector<std::int64_t>& ids) const {
  std::string text;
  for (auto id : ids) {
    if (id < 0 || static_cast<std::size_t>(id) >= id_to_token_.size()) throw std::runtime_error("token id " + std::to_string(id) + " is outside the vocabulary");
    if (id == cls_id_ || id == sep_id_ || id == pad_id_) continue;
    const std::string& piece = id_to_token_[static_cast<std::size_t>(id)];
    if (piece.compare(0, prefix_.size(), prefix_) == 0) text += piece.substr(prefix_.size());
    else text += (text.empty() ? "" : " ") + piece;
  }
  return text;
}

}  // namespace tessera
