#include "tokenizers/json_tokenizer.h"

#include "tokenizers/utf8.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <stdexcept>

namespace tessera {

using Json = nlohmann::json;

JsonTokenizer::~JsonTokenizer() = default;

JsonTokenizer::JsonTokenizer(const Json& j, const std::string& path) {
  const Json& m = j.at("model");
  unigram_ = m.value("type", "") == "Unigram";
  if (unigram_) {
    read_unigram(m);
  } else {
    read_bpe(m, path);
  }
  byte_fallback_ = m.value("byte_fallback", false);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = vocab_.find(name);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }
  const std::int64_t size = read_added(j, path);
  const std::string where = path;
  normalizers_ = parse_steps(j.value("normalizer", Json()), "normalizers", where + " (normalizer)");
  pre_tokenizers_ = parse_steps(j.value("pre_tokenizer", Json()), "pretokenizers", where + " (pre_tokenizer)");
  decoders_ = parse_steps(j.value("decoder", Json()), "decoders", where + " (decoder)");
  read_template(j, path);
  if (j.contains("padding") && j["padding"].is_object()) pad_id_ = j["padding"].value("pad_id", pad_id_);
  // Ids the tokenizer emits on its own must name a token (−1: unk or pad is none).
  auto check = [&](std::int64_t id, std::int64_t lowest, const char* what) {
    if (id < lowest || id >= size) throw std::runtime_error(path + ": " + what + " id " + std::to_string(id) + " is outside the vocabulary (" + std::to_string(size) + " ids)");
  };
  for (const auto id : template_.before) check(id, 0, "post_processor's special token");
  for (const auto id : template_.after) check(id, 0, "post_processor's special token");
  check(unk_id_, -1, "unk");
  check(pad_id_, -1, "padding's pad");
}

void JsonTokenizer::read_unigram(const Json& m) {
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
}

void JsonTokenizer::read_bpe(const Json& m, const std::string& path) {
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

std::int64_t JsonTokenizer::read_added(const Json& j, const std::string& path) {
  // Ids index the tables below and, later, the model's embedding: each must be ≥ 0, and
  // the highest within reach of the number of tokens (a sparse id like 2^40 would size the
  // tables after it).
  const Json added = j.value("added_tokens", Json::array());
  const std::int64_t id_limit = 2 * static_cast<std::int64_t>(vocab_.size() + added.size()) + 65536;
  auto check_id = [&](const std::string& token, std::int64_t id) {
    if (id < 0 || id >= id_limit)
      throw std::runtime_error(path + ": token '" + token + "' has id " + std::to_string(id) + ", outside [0, " + std::to_string(id_limit) + ")");
    return id;
  };
  std::int64_t size = 0;
  for (const auto& [t, id] : vocab_) size = std::max(size, check_id(t, id) + 1);
  for (const auto& a : added) size = std::max(size, check_id(a.at("content").get<std::string>(), a.at("id").get<std::int64_t>()) + 1);
  id_to_token_.resize(static_cast<std::size_t>(size));
  special_.assign(static_cast<std::size_t>(size), false);
  for (const auto& [t, id] : vocab_) id_to_token_[static_cast<std::size_t>(id)] = t;
  for (const auto& a : added) {
    Added t{a.at("content").get<std::string>(), a.at("id").get<std::int64_t>(), a.value("special", false), a.value("lstrip", false),
            a.value("rstrip", false)};
    id_to_token_[static_cast<std::size_t>(t.id)] = t.content;
    special_[static_cast<std::size_t>(t.id)] = t.special;
    added_.push_back(t);
  }
  std::stable_sort(added_.begin(), added_.end(), [](const Added& x, const Added& y) { return x.content.size() > y.content.size(); });
  return size;
}

void JsonTokenizer::read_template(const Json& j, const std::string& path) {
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
    for (const auto& piece : run_pre_tokenizers(pre_tokenizers_, run_normalizers(normalizers_, segment), first)) unigram_ ? unigram(piece, ids) : bpe(piece, ids);
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
  return run_decoders(decoders_, std::move(tokens));
}

}  // namespace tessera
