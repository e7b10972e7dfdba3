// Parts of load_config for files that hold a config's sections inside tables of their own
// (`tessera assess`'s matrix: each setup's [[methods]], [[groups]] and [train]). The same
// checks and the same file:line:column errors as a config file's.
#pragma once

#include "runtime/config.h"

#include <toml++/toml.h>

#include <string>

namespace tessera {

SourcePos source_of(const std::string& file, const toml::node& n);
// The file parsed, or a ConfigError at the syntax error's line and column.
toml::table parse_toml(const std::string& file);
// `t`'s methods and groups arrays, appended to c's.
void read_methods_and_groups(const std::string& file, const toml::table& t, Config& c);
// The [train] keys written in `t` over `c` (the rest keep their values); unknown keys refused.
void read_train_keys(const std::string& file, const toml::table* t, TrainConfig& c);
// ${VAR} expanded and a relative path taken from `file`'s directory, as config paths are.
std::string config_path(const std::string& file, const toml::node& n);

}  // namespace tessera
