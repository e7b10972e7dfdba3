#include "model/json_file.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <stdexcept>

namespace tessera {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  try {
    return nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

std::int64_t json_required_int(const nlohmann::json& j, const std::string& path, const char* key) {
  if (!j.contains(key) || !j[key].is_number_integer()) throw std::runtime_error(path + ": missing integer '" + key + "'");
  return j[key].get<std::int64_t>();
}

std::int64_t json_int_or(const nlohmann::json& j, const char* key, std::int64_t fallback) {
  return j.contains(key) && j[key].is_number_integer() ? j[key].get<std::int64_t>() : fallback;
}

double json_number_or(const nlohmann::json& j, const char* key, double fallback) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : fallback;
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
