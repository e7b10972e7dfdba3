// The subcommands of the `tessera` binary, one file each. A command adds its own options
// to its CLI11 subcommand and runs once the plugins are scanned; what it returns is the
// exit status. main (cli/main.cpp) holds the table.
#pragma once

#include "runtime/plugin_registry.h"

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace tessera {

struct Command {
  std::string name, help;
  std::function<void(CLI::App&)> options;
  std::function<int(const PluginRegistry&)> run;
};

Command plugins_command();   // cli/plugins.cpp
Command sites_command();     // cli/sites.cpp
Command train_command();     // cli/train.cpp
Command eval_command();      // cli/eval.cpp
Command generate_command();  // cli/generate.cpp
Command export_command();    // cli/export.cpp
Command merge_command();     // cli/merge.cpp
Command assess_command();    // cli/assess.cpp

}  // namespace tessera
