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

}  // namespace tessera
