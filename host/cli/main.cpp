// The `tessera` binary: a table of subcommands (cli/commands.h). Any error ends in one
// line on stderr and a non-zero exit; nothing a plugin or a file does aborts the host.
#include "cli/commands.h"
#include "cli/launch.h"

#include <spdlog/spdlog.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <filesystem>
#include <vector>

using namespace tessera;

int main(int argc, char** argv) {
  command_line().assign(argv, argv + argc);  // `train --nproc` starts its ranks with it
  CLI::App app{"Tessera: parameter-efficient fine-tuning of pretrained transformers"};
  app.require_subcommand(1);
  std::string log_level = "info";
  std::vector<std::string> plugin_dirs;
  bool allow_insecure_plugins = false;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_option("--plugin-dir", plugin_dirs, "extra plugin directory (repeatable; searched after the one beside the binary)");
  app.add_flag("--allow-insecure-plugins", allow_insecure_plugins,
               "load plugin files that users other than their owner and root can write to (refused by default)");

  const std::vector<Command> commands = {plugins_command(), sites_command(), train_command(), eval_command(), generate_command(), export_command(), merge_command(), assess_command()};
  std::vector<CLI::App*> subs;
  for (const auto& c : commands) {
    subs.push_back(app.add_subcommand(c.name, c.help));
    c.options(*subs.back());
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  spdlog::set_default_logger(spdlog::stderr_color_mt("tessera"));
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("[%H:%M:%S] [%^%l%$] %v");

  try {
    PluginRegistry registry;
    registry.allow_insecure(allow_insecure_plugins);
    registry.scan(PluginRegistry::search_path(std::filesystem::path("/proc/self/exe").string(), plugin_dirs));
    for (std::size_t i = 0; i < commands.size(); ++i)
      if (*subs[i]) return commands[i].run(registry);
    return 1;  // require_subcommand(1) makes this unreachable
  } catch (const std::exception& e) {
    spdlog::error("{}", one_line(e));
    return 1;
  }
}
