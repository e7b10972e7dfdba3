#include "train/dataset.h"

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

namespace tessera {

void seeded_shuffle(std::vector<std::size_t>& v, std::uint64_t seed) {
  std::uint64_t s = seed;
  auto next = [&s] {  // SplitMix64
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  };
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next() % i]);
}

std::vector<std::vector<std::string>> read_csv(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string s = buf.str();
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string field;
  bool quoted = false, any = false;
  std::size_t line = 1, quote_line = 0;
  std::size_t i = s.rfind("\xEF\xBB\xBF", 0) == 0 ? 3 : 0;  // byte-order mark
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (quoted) {
      if (c == '"') {
        if (i + 1 < s.size() && s[i + 1] == '"') { field += '"'; ++i; }
        else quoted = false;
      } else {
        if (c == '\n') ++line;
        field += c;
      }
    } else if (c == '"') {
      if (!field.empty()) throw std::runtime_error(path + ":" + std::to_string(line) + ": quote inside an unquoted field");
      quoted = true;
      quote_line = line;
      any = true;
    } else if (c == ',') {
      row.push_back(std::move(field));
      field.clear();
      any = true;
    } else if (c == '\n' || c == '\r') {
      if (c == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
      if (any || !field.empty()) { row.push_back(std::move(field)); rows.push_back(std::move(row)); }
      row.clear();
      field.clear();
      any = false;
      ++line;
    } else {
      field += c;
      any = true;
    }
  }
  if (quoted) throw std::runtime_error(path + ":" + std::to_string(quote_line) + ": quoted field never closed");
  if (any || !field.empty()) { row.push_back(std::move(field)); rows.push_back(std::move(row)); }
  return rows;
}

namespace {

struct Raw {
  std::string text, label, prompt, target;
  std::vector<std::string> words, tags;
  std::vector<std::string> sample_tags;
};

std::vector<Raw> read_csv_examples(const DataConfig& c, bool labelled) {
  auto rows = read_csv(c.path);
  if (rows.empty()) throw std::runtime_error(c.path + ": empty file");
  const auto& header = rows[0];
  auto column = [&](const std::string& name) {
    auto it = std::find(header.begin(), header.end(), name);
    if (it == header.end()) throw std::runtime_error(c.path + ": no column '" + name + "' in the header");
    return static_cast<std::size_t>(it - header.begin());
  };
  const std::size_t t = column(c.text_column), l = labelled ? column(c.label_column) : t;
  const std::size_t p = c.prompt_column.empty() ? t : column(c.prompt_column);
  const std::size_t g = c.target_column.empty() ? t : column(c.target_column);
  std::vector<std::size_t> tag_columns;
  for (const auto& tag : c.tag_columns) tag_columns.push_back(column(tag));
  std::vector<Raw> out;
  for (std::size_t r = 1; r < rows.size(); ++r) {
    if (rows[r].size() != header.size())
      throw std::runtime_error(c.path + ": record " + std::to_string(r + 1) + " has " + std::to_string(rows[r].size()) +
                               " fields, the header " + std::to_string(header.size()));
    out.push_back({rows[r][t], labelled ? rows[r][l] : "", c.prompt_column.empty() ? "" : rows[r][p],
                   c.target_column.empty() ? "" : rows[r][g]});
    for (const auto k : tag_columns) out.back().sample_tags.push_back(rows[r][k]);
  }
  return out;
}

std::vector<Raw> read_jsonl_examples(const DataConfig& c, bool labelled, bool words) {
  std::ifstream in(c.path);
  if (!in) throw std::runtime_error("cannot read " + c.path);
  std::vector<Raw> out;
  std::vector<std::vector<std::string>> sample_tags;  // per example: every parsed line adds one
  std::string line;
  for (std::size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto where = c.path + ":" + std::to_string(n) + ": ";
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      throw std::runtime_error(where + "not JSON: " + e.what());
    }
    auto& tags = sample_tags.emplace_back();  // the tag columns' values (numbers and booleans as written)
    for (const auto& tag : c.tag_columns) {
      if (!j.is_object() || !j.contains(tag) || j[tag].is_structured() || j[tag].is_null())
        throw std::runtime_error(where + "needs a value '" + tag + "' (a [data] tag_columns entry)");
      tags.push_back(j[tag].is_string() ? j[tag].get<std::string>() : j[tag].dump());
    }
    if (words) {  // token-classification: parallel arrays of words and tags
      auto strings = [&](const std::string& key) {
        if (!j.is_object() || !j.contains(key) || !j[key].is_array()) throw std::runtime_error(where + "needs an array '" + key + "'");
        std::vector<std::string> v;
        for (const auto& x : j[key]) {
          if (!x.is_string() && !x.is_number_integer()) throw std::runtime_error(where + "'" + key + "' must hold strings or integers");
          v.push_back(x.is_string() ? x.get<std::string>() : x.dump());
        }
        return v;
      };
      Raw r;
      r.words = strings(c.text_column), r.tags = strings(c.label_column);
      if (r.words.size() != r.tags.size() || r.words.empty())
        throw std::runtime_error(where + std::to_string(r.words.size()) + " words but " + std::to_string(r.tags.size()) + " tags");
      for (const auto& w : r.words) r.text += (r.text.empty() ? "" : " ") + w;
      out.push_back(std::move(r));
      continue;
    }
    if (!j.is_object() || !j.contains(c.text_column) || !j[c.text_column].is_string())
      throw std::runtime_error(where + "needs a string '" + c.text_column + "'");
    std::string prompt;
    if (!c.prompt_column.empty()) {
      if (!j.contains(c.prompt_column) || !j[c.prompt_column].is_string()) throw std::runtime_error(where + "needs a string '" + c.prompt_column + "'");
      prompt = j[c.prompt_column].get<std::string>();
    }
    std::string target;
    if (!c.target_column.empty()) {
      if (!j.contains(c.target_column) || !j[c.target_column].is_string()) throw std::runtime_error(where + "needs a string '" + c.target_column + "'");
      target = j[c.target_column].get<std::string>();
    }
    if (!labelled) {
      out.push_back({j[c.text_column].get<std::string>(), "", prompt, target});
      continue;
    }
    if (!j.contains(c.label_column)) throw std::runtime_error(where + "needs '" + c.label_column + "'");
    const auto& l = j[c.label_column];
    if (!l.is_string() && !l.is_number_integer() && !l.is_boolean())
      throw std::runtime_error(where + "'" + c.label_column + "' must be a string, integer or boolean");
    out.push_back({j[c.text_column].get<std::string>(), l.is_string() ? l.get<std::string>() : l.dump(), prompt, target});
  }
  for (std::size_t i = 0; i < out.size(); ++i) out[i].sample_tags = std::move(sample_tags[i]);
  return out;
}

// An integer label that fits in 64 bits (longer digit strings sort as text).
bool is_integer(const std::string& s) {
  if (s.empty() || s.size() > 18) return false;
  std::size_t i = (s[0] == '-' || s[0] == '+') ? 1 : 0;
  return i < s.size() && std::all_of(s.begin() + static_cast<long>(i), s.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
}

}  // namespace

Dataset load_dataset(const DataConfig& c, Labels labels) {
  const bool labelled = labels == Labels::PerExample, words = labels == Labels::PerWord;
  std::string format = c.format;
  if (format == "auto") {
    auto ends = [&](const std::string& ext) { return c.path.size() >= ext.size() && c.path.compare(c.path.size() - ext.size(), ext.size(), ext) == 0; };
    format = ends(".jsonl") || ends(".json") ? "jsonl" : "csv";
  }
  if (words && format != "jsonl") throw std::runtime_error(c.path + ": token-classification reads JSON lines (arrays of words and tags)");
  std::vector<Raw> raw = format == "jsonl" ? read_jsonl_examples(c, labelled, words) : read_csv_examples(c, labelled);
  if (c.limit > 0 && raw.size() > static_cast<std::size_t>(c.limit)) {
    // A limit keeps a seeded sample, not the head of the file (files are often sorted by label).
    std::vector<std::size_t> idx(raw.size());
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    seeded_shuffle(idx, static_cast<std::uint64_t>(c.seed) ^ 0x5eedULL);
    idx.resize(static_cast<std::size_t>(c.limit));
    std::sort(idx.begin(), idx.end());
    std::vector<Raw> kept;
    for (auto i : idx) kept.push_back(std::move(raw[i]));
    raw = std::move(kept);
  }
  if (raw.size() < 2) throw std::runtime_error(c.path + ": fewer than two examples");

  Dataset d;
  std::vector<std::string> names;
  for (const auto& r : raw) {
    if (labelled && std::find(names.begin(), names.end(), r.label) == names.end()) names.push_back(r.label);
    for (const auto& t : r.tags)
      if (std::find(names.begin(), names.end(), t) == names.end()) names.push_back(t);
  }
  if ((labelled || words) && names.size() < 2)
    throw std::runtime_error(c.path + ": " + (words ? "the tags" : "column '" + c.label_column + "'") + " hold" + (words ? "" : "s") +
                             (names.empty() ? " no label" : " a single label ('" + names[0] + "')") + ": a classifier needs at least two");
  // A label per example (or nearly): a classifier cannot learn classes it sees once. When
  // those labels are also longer than the texts, the two columns are swapped in the header
  // or the config, and the run would train one class per sentence: refused, else warned.
  if (labelled && names.size() >= 10 && 2 * names.size() > raw.size()) {
    double label_chars = 0, text_chars = 0;
    for (const auto& r : raw) label_chars += static_cast<double>(r.label.size()), text_chars += static_cast<double>(r.text.size());
    const auto n = static_cast<double>(raw.size());
    const std::string counted = c.path + ": column '" + c.label_column + "' holds " + std::to_string(names.size()) + " distinct labels in " +
                                std::to_string(raw.size()) + " examples";
    if (label_chars > text_chars)
      throw std::runtime_error(counted + ", longer than the texts of column '" + c.text_column + "' (" + std::to_string(std::lround(label_chars / n)) +
                               " against " + std::to_string(std::lround(text_chars / n)) +
                               " characters on average): are the two columns swapped? ([data] text_column, label_column)");
    spdlog::warn("{}: most classes have a single example to learn from", counted);
  }
  bool numeric = std::all_of(names.begin(), names.end(), is_integer);
  std::sort(names.begin(), names.end(), [&](const std::string& a, const std::string& b) {
    return numeric ? std::stoll(a) < std::stoll(b) : a < b;
  });
  d.label_names = names;
  std::map<std::string, std::int64_t> index;
  for (std::size_t i = 0; i < names.size(); ++i) index[names[i]] = static_cast<std::int64_t>(i);

  std::vector<std::size_t> order(raw.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  seeded_shuffle(order, static_cast<std::uint64_t>(c.seed));
  const auto n_test = std::max<std::size_t>(1, static_cast<std::size_t>(static_cast<double>(raw.size()) * c.test_fraction + 0.5));
  for (std::size_t k = 0; k < order.size(); ++k) {
    const Raw& r = raw[order[k]];
    Example e{r.text, labelled ? index[r.label] : 0, r.prompt, r.target, r.words, {}, r.sample_tags};
    for (const auto& t : r.tags) e.tags.push_back(index[t]);
    (k < n_test ? d.test : d.train).push_back(std::move(e));
  }
  return d;
}

}  // namespace tessera
