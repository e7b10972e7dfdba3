// Reading a JSON file with errors that name it (config.json, tokenizer.json,
// adapter_config.json …).
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <string>

namespace tessera {

// Throws std::runtime_error "<path>: <reason>" when the file cannot be read or parsed.
nlohmann::json read_json_file(const std::string& path);

}  // namespace tessera
