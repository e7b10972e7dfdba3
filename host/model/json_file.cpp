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

}  // namespace tessera
