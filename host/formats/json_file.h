// Reading a JSON file with errors that name it (config.json, tokenizer.json,
// adapter_config.json …).
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>

namespace tessera {

// Throws std::runtime_error "<path>: <reason>" when the file cannot be read or parsed.
nlohmann::json read_json_file(const std::string& path);

// The fields of one object of a model's config.json, each checked as it is read: a key
// that is absent or null gives the fallback, one of another type or out of range is
// refused with file and key ("<path>: num_attention_heads must be an integer ≥ 1, got 0"),
// so that a bad config fails at load with its cause, not later inside a tensor operation
// (or, for a zero head count, as a division by zero). `prefix` names a nested object in
// those messages ("rope_scaling.").
class JsonFields {
 public:
  JsonFields(const nlohmann::json& object, std::string path, std::string prefix = "");

  const std::string& path() const { return path_; }
  bool has(const char* key) const;  // present and not null
  std::int64_t size(const char* key) const;                             // required, ≥ 1
  std::int64_t size_or(const char* key, std::int64_t fallback) const;  // ≥ 1 when given
  std::int64_t int_or(const char* key, std::int64_t fallback) const;
  // A number (an integer is one); the others also check its range.
  double number_or(const char* key, double fallback) const;
  double nonnegative_or(const char* key, double fallback) const;  // ≥ 0
  double positive_or(const char* key, double fallback) const;     // > 0
  double probability_or(const char* key, double fallback) const;  // in [0, 1]
  bool bool_or(const char* key, bool fallback) const;
  std::string string_or(const char* key, const std::string& fallback) const;
  // "<path>: <prefix><key> <what>" as a std::runtime_error.
  [[noreturn]] void fail(const char* key, const std::string& what) const;

 private:
  const nlohmann::json* get(const char* key) const;  // nullptr when absent or null
  double number_in(const char* key, double fallback, bool (*ok)(double), const char* range) const;
  const nlohmann::json& j_;
  std::string path_, prefix_;
};

// In a catch block: rethrows a JSON library error (a value of the wrong type or a missing
// key somewhere in a file; its message names the place in the file) as a
// std::runtime_error with `file` in front, and anything else unchanged:
//   try { … } catch (...) { rethrow_naming(path); }
[[noreturn]] void rethrow_naming(const std::string& file);

// Lenient reads for files whose optional keys are advisory (tokenizer_config.json): a
// key that is absent, null or of another type gives the fallback.
std::int64_t json_int_or(const nlohmann::json& j, const char* key, std::int64_t fallback);
bool json_bool_or(const nlohmann::json& j, const char* key, bool fallback);
// A special token as tokenizer_config.json writes it, "</s>" or {"content": "</s>", …}:
// its text, "" for anything else (null: no such token); json_token_or gives `fallback`
// when the key is absent.
std::string json_token_text(const nlohmann::json& t);
std::string json_token_or(const nlohmann::json& j, const char* key, const std::string& fallback);

}  // namespace tessera
