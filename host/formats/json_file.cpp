#include "formats/json_file.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <stdexcept>

namespace tessera {

void rethrow_naming(const std::string& file) {
  try {
    throw;
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(file + ": " + e.what());
  }
}

JsonFields::JsonFields(const nlohmann::json& object, std::string path, std::string prefix)
    : j_(object), path_(std::move(path)), prefix_(std::move(prefix)) {
  if (!j_.is_object()) throw std::runtime_error(path_ + ": " + (prefix_.empty() ? "not a JSON object" : prefix_.substr(0, prefix_.size() - 1) + " must be an object"));
}

void JsonFields::fail(const char* key, const std::string& what) const { throw std::runtime_error(path_ + ": " + prefix_ + key + " " + what); }

const nlohmann::json* JsonFields::get(const char* key) const {
  const auto it = j_.find(key);
  return it == j_.end() || it->is_null() ? nullptr : &*it;
}

bool JsonFields::has(const char* key) const { return get(key) != nullptr; }

std::int64_t JsonFields::size(const char* key) const {
  if (!has(key)) fail(key, "is missing (an integer ≥ 1)");
  return size_or(key, 0);
}

std::int64_t JsonFields::size_or(const char* key, std::int64_t fallback) const {
  const auto* v = get(key);
  if (v == nullptr) return fallback;
  if (!v->is_number_integer() || v->get<std::int64_t>() < 1) fail(key, "must be an integer ≥ 1, got " + v->dump());
  return v->get<std::int64_t>();
}

std::int64_t JsonFields::int_or(const char* key, std::int64_t fallback) const {
  const auto* v = get(key);
  if (v == nullptr) return fallback;
  if (!v->is_number_integer()) fail(key, "must be an integer, got " + v->dump());
  return v->get<std::int64_t>();
}

double JsonFields::number_in(const char* key, double fallback, bool (*ok)(double), const char* range) const {
  const auto* v = get(key);
  if (v == nullptr) return fallback;
  if (!v->is_number() || !ok(v->get<double>())) fail(key, std::string("must be a number") + range + ", got " + v->dump());
  return v->get<double>();
}

double JsonFields::number_or(const char* key, double fallback) const {
  return number_in(key, fallback, [](double) { return true; }, "");
}
double JsonFields::nonnegative_or(const char* key, double fallback) const {
  return number_in(key, fallback, [](double x) { return x >= 0; }, " ≥ 0");
}
double JsonFields::positive_or(const char* key, double fallback) const {
  return number_in(key, fallback, [](double x) { return x > 0; }, " > 0");
}
double JsonFields::probability_or(const char* key, double fallback) const {
  return number_in(key, fallback, [](double x) { return x >= 0 && x <= 1; }, " in [0, 1]");
}

bool JsonFields::bool_or(const char* key, bool fallback) const {
  const auto* v = get(key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) fail(key, "must be true or false, got " + v->dump());
  return v->get<bool>();
}

std::string JsonFields::string_or(const char* key, const std::string& fallback) const {
  const auto* v = get(key);
  if (v == nullptr) return fallback;
  if (!v->is_string()) fail(key, "must be a string, got " + v->dump());
  return v->get<std::string>();
}

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  try {
    return nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

std::int64_t json_int_or(const nlohmann::json& j, const char* key, std::int64_t fallback) {
  return j.contains(key) && j[key].is_number_integer() ? j[key].get<std::int64_t>() : fallback;
}

bool json_bool_or(const nlohmann::json& j, const char* key, bool fallback) {
  return j.contains(key) && j[key].is_boolean() ? j[key].get<bool>() : fallback;
}

std::string json_token_or(const nlohmann::json& j, const char* key, const std::string& fallback) {
  return j.contains(key) ? json_token_text(j[key]) : fallback;
}

std::string json_token_text(const nlohmann::json& t) {
  if (t.is_string()) return t.get<std::string>();
  if (t.is_object() && t.contains("content") && t["content"].is_string()) return t["content"].get<std::string>();
  return "";
}

}  // namespace tessera
