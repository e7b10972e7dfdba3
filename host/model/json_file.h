// Reading a JSON file with errors that name it (config.json, tokenizer.json,
// adapter_config.json …).
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>

namespace tessera {

// Throws std::runtime_error "<path>: <reason>" when the file cannot be read or parsed.
nlohmann::json read_json_file(const std::string& path);

// Fields of a config object: a required integer (the error names file and key), and
// optional ones with a fallback when absent or null.
std::int64_t json_required_int(const nlohmann::json& j, const std::string& path, const char* key);
std::int64_t json_int_or(const nlohmann::json& j, const char* key, std::int64_t fallback);
double json_number_or(const nlohmann::json& j, const char* key, double fallback);
bool json_bool_or(const nlohmann::json& j, const char* key, bool fallback);
// A special token as tokenizer_config.json writes it, "</s>" or {"content": "</s>", …}:
// its text, "" for anything else (null: no such token); json_token_or gives `fallback`
// when the key is absent.
std::string json_token_text(const nlohmann::json& t);
std::string json_token_or(const nlohmann::json& j, const char* key, const std::string& fallback);

}  // namespace tessera
