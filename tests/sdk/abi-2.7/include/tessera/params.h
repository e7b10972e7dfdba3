// Method parameters: the schema a plugin declares in describe(), and the checked values
// the host hands to validate() and attach(). Free of torch so that the config reader and
// `tessera plugins` stay light.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace tessera {

enum class ParamType { Bool, Int, Float, String, StringList, NumberTable };

// A NumberTable maps target patterns to numbers (per-target rank or alpha).
using NumberTable = std::map<std::string, double>;
using ParamValue =
    std::variant<bool, std::int64_t, double, std::string, std::vector<std::string>, NumberTable>;

const char* to_string(ParamType t);
ParamType type_of(const ParamValue& v);
std::string format_value(const ParamValue& v);  // TOML-like rendering for listings

struct ParamSpec {
  std::string name;
  ParamType type;
  ParamValue default_value;
  std::string doc;
  std::optional<double> min;          // inclusive, numeric types only
  std::optional<double> max;          // inclusive, numeric types only
  std::vector<std::string> choices;   // allowed values of a String, empty = any
};

// A parameter problem found by a plugin's validate(): the host adds file, line, column.
class ParamError : public std::runtime_error {
 public:
  ParamError(std::string key, const std::string& message)
      : std::runtime_error(message), key_(std::move(key)) {}
  const std::string& key() const { return key_; }

 private:
  std::string key_;
};

// Checked values: every key of the schema is present (defaults filled in by the host).
class Params {
 public:
  Params() = default;
  explicit Params(std::map<std::string, ParamValue> values) : values_(std::move(values)) {}

  template <class T>
  const T& get(const std::string& key) const {
    auto it = values_.find(key);
    if (it == values_.end()) throw ParamError(key, "missing parameter '" + key + "'");
    if (auto* v = std::get_if<T>(&it->second)) return *v;
    throw ParamError(key, "parameter '" + key + "' has another type");
  }
  std::int64_t integer(const std::string& key) const { return get<std::int64_t>(key); }
  double number(const std::string& key) const;  // Int or Float
  bool flag(const std::string& key) const { return get<bool>(key); }
  const std::string& text(const std::string& key) const { return get<std::string>(key); }

  bool contains(const std::string& key) const { return values_.count(key) != 0; }
  void set(const std::string& key, ParamValue v) { values_[key] = std::move(v); }
  const std::map<std::string, ParamValue>& values() const { return values_; }

 private:
  std::map<std::string, ParamValue> values_;
};

// Fills defaults and checks types, ranges and choices against the schema. Unknown keys
// are the caller's business (the config reader reports them with their position).
Params apply_schema(const std::vector<ParamSpec>& schema, std::map<std::string, ParamValue> given);

}  // namespace tessera
