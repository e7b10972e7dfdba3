#include "tokenizers/spm_convert.h"

#include "formats/json_file.h"
#include "tokenizers/spm_proto.h"
#include "tokenizers/utf8.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <unordered_map>

namespace tessera {
namespace {

using Json = nlohmann::json;
const char* const kSpace = "\u2581";  // SentencePiece's ▁, what a space becomes

std::string string_or(const Json& j, const char* key, const std::string& fallback) {
  return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : fallback;
}

// tokenizer.json stores the charsmap in base64.
std::string encode_base64(const std::string& bytes) {
  static const char* abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) | (static_cast<unsigned char>(bytes[i + 1]) << 8) | static_cast<unsigned char>(bytes[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += abc[(v >> s) & 63];
  }
  if (i < bytes.size()) {
    const bool two = i + 1 < bytes.size();
    const unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) | (two ? static_cast<unsigned char>(bytes[i + 1]) << 8 : 0);
    out += abc[(v >> 18) & 63], out += abc[(v >> 12) & 63];
    out += two ? abc[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

// BPE merges from the vocabulary alone, as transformers makes them for a SentencePiece BPE
// model: every split of a piece into two pieces of the vocabulary, ordered by the piece's
// id, then by the left part's length in characters.
Json merges_of(const std::vector<SpmProto::Piece>& pieces, const std::unordered_map<std::string, std::int64_t>& vocab) {
  Json merges = Json::array();
  for (const auto& p : pieces) {
    const std::u32string chars = decode_utf8(p.text);
    std::string left;
    for (std::size_t k = 1; k < chars.size(); ++k) {
      append_utf8(left, chars[k - 1]);
      std::string right;
      for (std::size_t r = k; r < chars.size(); ++r) append_utf8(right, chars[r]);
      if (vocab.count(left) && vocab.count(right)) merges.push_back(Json::array({left, right}));
    }
  }
  return merges;
}

Json metaspace(const std::string& scheme, bool split) {
  return {{"type", "Metaspace"}, {"replacement", kSpace}, {"prepend_scheme", scheme}, {"split", split}};
}

Json template_of(const std::vector<std::pair<std::string, std::int64_t>>& before, const std::vector<std::pair<std::string, std::int64_t>>& after) {
  Json single = Json::array(), specials = Json::object();
  auto special = [&](const std::pair<std::string, std::int64_t>& t) {
    single.push_back({{"SpecialToken", {{"id", t.first}, {"type_id", 0}}}});
    specials[t.first] = {{"id", t.first}, {"ids", {t.second}}, {"tokens", {t.first}}};
  };
  for (const auto& t : before) special(t);
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  for (const auto& t : after) special(t);
  return {{"type", "TemplateProcessing"}, {"single", single}, {"special_tokens", specials}};
}

using Token = std::pair<std::string, std::int64_t>;  // text, id (-1: not in the model)

// T5: a Unigram model over the pieces and their scores, the precompiled normalizer,
// whitespace split then Metaspace, EOS appended.
void unigram_parts(Json& j, const SpmProto& proto, std::int64_t unk, const Token& eos) {
  Json vocab = Json::array();
  for (const auto& p : proto.pieces) vocab.push_back(Json::array({p.text, p.score}));
  j["model"] = {{"type", "Unigram"}, {"unk_id", unk}, {"vocab", std::move(vocab)}, {"byte_fallback", false}};
  j["normalizer"] = proto.precompiled_charsmap.empty() ? Json() : Json{{"type", "Precompiled"}, {"precompiled_charsmap", encode_base64(proto.precompiled_charsmap)}};
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "WhitespaceSplit"}}, metaspace("always", true)}}};
  j["decoder"] = metaspace("always", true);
  j["post_processor"] = template_of({}, {eos});
}

// LLaMA: BPE with byte fallback over merges rebuilt from the scores, Metaspace as the
// config's add_prefix_space and legacy say, BOS (and EOS) as add_bos_token (add_eos_token) say.
void bpe_parts(Json& j, const SpmProto& proto, const Json& tc, const std::string& file, const Token& bos, const Token& eos) {
  const bool prefix = json_bool_or(tc, "add_prefix_space", true), legacy = json_bool_or(tc, "legacy", false);
  const bool add_bos = json_bool_or(tc, "add_bos_token", true), add_eos = json_bool_or(tc, "add_eos_token", false);
  if (add_bos && bos.second < 0) throw std::runtime_error(file + ": the template adds BOS but the model has no piece '" + bos.first + "'");
  if (add_eos && eos.second < 0) throw std::runtime_error(file + ": the template adds EOS but the model has no piece '" + eos.first + "'");
  std::unordered_map<std::string, std::int64_t> vocab_ids;
  Json vocab = Json::object();
  for (std::size_t i = 0; i < proto.pieces.size(); ++i) {
    const auto& text = proto.pieces[i].text;
    vocab_ids[text] = static_cast<std::int64_t>(i), vocab[text] = i;  // a repeated piece keeps its last id, as a dict would
  }
  j["model"] = {{"type", "BPE"}, {"vocab", std::move(vocab)}, {"merges", merges_of(proto.pieces, vocab_ids)}, {"fuse_unk", true},
                {"byte_fallback", true}, {"unk_token", nullptr}};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = metaspace(!prefix ? "never" : legacy ? "always" : "first", false);
  Json decoders = {{{"type", "Replace"}, {"pattern", {{"String", kSpace}}}, {"content", " "}}, {{"type", "ByteFallback"}}, {{"type", "Fuse"}}};
  if (prefix) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  j["decoder"] = {{"type", "Sequence"}, {"decoders", decoders}};
  std::vector<Token> before, after;
  if (add_bos) before.push_back(bos);
  if (add_eos) after.push_back(eos);
  j["post_processor"] = template_of(before, after);
}

}  // namespace

std::optional<Json> spm_tokenizer_json(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string file = find_spm_model(dir);
  if (file.empty()) throw std::runtime_error(dir + ": neither tokenizer.model nor spiece.model found");
  Json tc = Json::object(), mc = Json::object();
  if (fs::exists(fs::path(dir) / "tokenizer_config.json")) tc = read_json_file((fs::path(dir) / "tokenizer_config.json").string());
  if (fs::exists(fs::path(dir) / "config.json")) mc = read_json_file((fs::path(dir) / "config.json").string());
  std::string cls = string_or(tc, "tokenizer_class", "");
  if (cls.size() > 4 && cls.compare(cls.size() - 4, 4, "Fast") == 0) cls.resize(cls.size() - 4);
  const std::string type = string_or(mc, "model_type", "");
  const bool t5 = cls == "T5Tokenizer" || (cls.empty() && type == "t5");
  const bool llama = cls == "LlamaTokenizer" || (cls.empty() && (type == "llama" || type == "mistral"));
  if (!t5 && !llama) return std::nullopt;

  const SpmProto proto = read_spm_proto(file);
  const auto n = static_cast<std::int64_t>(proto.pieces.size());
  std::unordered_map<std::string, std::int64_t> ids;  // piece or added token -> id
  for (std::int64_t i = 0; i < n; ++i) ids.emplace(proto.pieces[static_cast<std::size_t>(i)].text, i);

  // Added tokens by id: control pieces (special), user-defined pieces (not special).
  struct Added {
    std::string content;
    bool special = true, lstrip = false, rstrip = false;
  };
  std::map<std::int64_t, Added> added;
  std::int64_t unk = -1;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto& p = proto.pieces[static_cast<std::size_t>(i)];
    if (p.type == SpmProto::control || p.type == SpmProto::user_defined) added[i] = {p.text, p.type == SpmProto::control};
    if (p.type == SpmProto::unknown && unk < 0) unk = i;
  }
  // T5's sentinels follow the pieces, <extra_id_0> last.
  std::int64_t extras = 0;
  if (t5) {
    std::int64_t listed = 0;
    if (tc.contains("additional_special_tokens") && tc["additional_special_tokens"].is_array())
      for (const auto& t : tc["additional_special_tokens"]) listed += json_token_text(t).rfind("<extra_id_", 0) == 0;
    extras = listed > 0 ? listed : std::max<std::int64_t>(0, json_int_or(tc, "extra_ids", 100));
    for (std::int64_t i = 0; i < extras; ++i) {
      const std::string name = "<extra_id_" + std::to_string(i) + ">";
      added[n + extras - 1 - i] = {name};
      ids[name] = n + extras - 1 - i;
    }
  }
  // The named special tokens, where the vocabulary has them.
  const std::string bos = json_token_or(tc, "bos_token", t5 ? "" : "<s>"), eos = json_token_or(tc, "eos_token", "</s>");
  const std::string unk_name = json_token_or(tc, "unk_token", "<unk>"), pad = json_token_or(tc, "pad_token", t5 ? "<pad>" : "");
  auto id_of = [&](const std::string& text) -> std::int64_t {
    if (text.empty()) return -1;
    const auto it = ids.find(text);
    return it == ids.end() ? -1 : it->second;
  };
  for (const std::string& name : {bos, eos, unk_name, pad})
    if (const auto id = id_of(name); id >= 0) added[id].content = name, added[id].special = true;
  // tokenizer_config.json's own record of its added tokens carries their strip flags.
  if (tc.contains("added_tokens_decoder") && tc["added_tokens_decoder"].is_object())
    for (const auto& [key, t] : tc["added_tokens_decoder"].items()) {
      if (key.empty() || key.find_first_not_of("0123456789") != std::string::npos || key.size() > 12) continue;  // not an id
      const std::int64_t id = std::stoll(key);
      if (!t.is_object() || !t.contains("content") || !t["content"].is_string() || (id < n + extras && id_of(t["content"]) != id)) continue;
      added[id] = {t["content"].get<std::string>(), json_bool_or(t, "special", true), json_bool_or(t, "lstrip", false), json_bool_or(t, "rstrip", false)};
    }

  Json j = {{"version", "1.0"}};
  j["added_tokens"] = Json::array();
  for (const auto& [id, a] : added)
    j["added_tokens"].push_back({{"id", id}, {"content", a.content}, {"special", a.special}, {"lstrip", a.lstrip}, {"rstrip", a.rstrip},
                                 {"normalized", false}, {"single_word", false}});
  if (t5) {
    if (unk < 0) unk = id_of(unk_name);
    if (unk < 0) throw std::runtime_error(file + ": the model has no unknown piece, which a T5 (Unigram) tokenizer needs");
    if (id_of(eos) < 0) throw std::runtime_error(file + ": the EOS token '" + eos + "' that T5's template appends is not in the model");
    unigram_parts(j, proto, unk, {eos, id_of(eos)});
  } else {
    bpe_parts(j, proto, tc, file, {bos, id_of(bos)}, {eos, id_of(eos)});
  }
  if (id_of(pad) >= 0) j["padding"] = {{"pad_id", id_of(pad)}};
  return j;
}

}  // namespace tessera
