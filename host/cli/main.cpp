// The `tessera` binary: `plugins`, `train`, `eval`. Any error ends in one line on stderr
// and a non-zero exit; nothing a plugin or a file does aborts the host.
#include "model/safetensors.h"
#include "runtime/config.h"
#include "runtime/plugin_registry.h"
#include "train/progress.h"
#include "train/session.h"
#include "train/trainer.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

namespace fs = std::filesystem;
using namespace tessera;

namespace {

std::string number(double x) {
  std::ostringstream o;
  o << x;
  return o.str();
}

void print_plugins(const PluginRegistry& reg) {
  std::cout << reg.plugins().size() << " plugin(s) found\n";
  for (const auto& p : reg.plugins()) {
    std::cout << "\n" << p.id << " " << p.version << "  [" << p.family << "]  " << p.summary << "\n"
              << "  paper: " << p.paper << "\n  file:  " << p.path << "\n  parameters:\n";
    for (const auto& s : p.params) {
      std::cout << "    " << s.name << " (" << to_string(s.type) << ", default " << format_value(s.default_value);
      if (s.min || s.max) std::cout << ", range [" << (s.min ? number(*s.min) : "-inf") << ", " << (s.max ? number(*s.max) : "inf") << "]";
      if (!s.choices.empty()) {
        std::cout << ", one of";
        for (const auto& c : s.choices) std::cout << " " << c;
      }
      std::cout << ")\n        " << s.doc << "\n";
    }
  }
  if (!reg.refused().empty()) {
    std::cout << "\n" << reg.refused().size() << " refused:\n";
    for (const auto& r : reg.refused()) std::cout << "  " << r.path << ": " << r.reason << "\n";
  }
}

std::string report(const Config& c, const TrainResult& r, const std::vector<std::string>& labels) {
  std::ostringstream o;
  o << "# Tessera run\n\n"
    << "- config: `" << c.file << "`\n- model: `" << c.model.path << "` (" << c.model.dtype << ", " << c.model.device << ")\n"
    << "- data: `" << c.data.path << "`, labels:";
  for (const auto& l : labels) o << " `" << l << "`";
  o << "\n- methods:";
  if (c.methods.empty()) o << " none (task head only)";
  for (const auto& m : c.methods) o << " `" << m.name << "` (" << m.plugin << ")";
  o << "\n\n| metric | value |\n|---|---|\n"
    << "| test accuracy | " << r.test.accuracy << " |\n| test loss | " << r.test.loss << " |\n"
    << "| trainable parameters | " << r.trainable << " (" << 100.0 * static_cast<double>(r.trainable) / static_cast<double>(r.base) << "% of " << r.base << ") |\n"
    << "| optimizer steps | " << r.steps << " |\n| wall time | " << format_duration(r.seconds) << " |\n"
    << "| examples/s (training) | " << r.examples_per_s << " |\n";
  return o.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Tessera: parameter-efficient fine-tuning of pretrained transformers"};
  app.require_subcommand(1);
  std::string log_level = "info";
  std::vector<std::string> plugin_dirs;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_option("--plugin-dir", plugin_dirs, "extra plugin directory (repeatable; searched after the one beside the binary)");

  auto* plugins_cmd = app.add_subcommand("plugins", "list the plugins found and the ones refused");
  std::string config_path, run_dir, eval_dir;
  std::int64_t threads = -1;
  auto* train_cmd = app.add_subcommand("train", "fine-tune as a config file says");
  train_cmd->add_option("config", config_path, "TOML config")->required();
  train_cmd->add_option("--run-dir", run_dir, "run directory (default: [output] dir)");
  train_cmd->add_option("--threads", threads, "override [train] threads");
  auto* eval_cmd = app.add_subcommand("eval", "reload base + adapter of a run and evaluate its test split");
  eval_cmd->add_option("run_dir", eval_dir, "run directory written by `tessera train`")->required()->check(CLI::ExistingDirectory);
  eval_cmd->add_option("--threads", threads, "override [train] threads");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto logger = spdlog::stderr_color_mt("tessera");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("[%H:%M:%S] [%^%l%$] %v");

  try {
    PluginRegistry registry;
    registry.scan(PluginRegistry::search_path(fs::path("/proc/self/exe").string(), plugin_dirs));
    if (*plugins_cmd) {
      print_plugins(registry);
      return 0;
    }
    if (*eval_cmd) config_path = (fs::path(eval_dir) / "config.toml").string();
    Config config = load_config(config_path);
    check_methods(config, registry);
    if (threads >= 0) config.train.threads = threads;
    set_threads(config.train.threads);

    if (*train_cmd) {
      if (run_dir.empty()) run_dir = config.output_dir;
      fs::create_directories(run_dir);
      config.output_dir = run_dir;
      write_file_atomic((fs::path(run_dir) / "config.toml").string(), resolved_toml(config));
      Session session(config, registry);
      TrainResult r = train(session, run_dir);
      nlohmann::json result = {{"test_accuracy", r.test.accuracy}, {"test_loss", r.test.loss}, {"test_examples", r.test.examples},
                               {"trainable_parameters", r.trainable}, {"base_parameters", r.base}, {"steps", r.steps},
                               {"seconds", r.seconds}, {"examples_per_s", r.examples_per_s}};
      write_file_atomic((fs::path(run_dir) / "result.json").string(), result.dump(2) + "\n");
      write_file_atomic((fs::path(run_dir) / "report.md").string(), report(config, r, session.data().label_names));
      std::printf("test accuracy %.4f on %lld examples; trainable %.3f%% of the base; %s wall; run directory %s\n", r.test.accuracy,
                  static_cast<long long>(r.test.examples), 100.0 * static_cast<double>(r.trainable) / static_cast<double>(r.base),
                  format_duration(r.seconds).c_str(), run_dir.c_str());
      return 0;
    }
    Session session(config, registry);
    session.load_adapter((fs::path(eval_dir) / "adapter").string());
    EvalResult ev = evaluate(session, Split::Test);
    std::printf("test accuracy %.4f on %lld examples (loss %.6f)\n", ev.accuracy, static_cast<long long>(ev.examples), ev.loss);
    std::ifstream recorded(fs::path(eval_dir) / "result.json");
    if (recorded) {
      auto j = nlohmann::json::parse(recorded);
      const double was = j.value("test_accuracy", -1.0);
      std::printf("%s the accuracy recorded at training time (%.4f)\n", was == ev.accuracy ? "reproduces" : "DIFFERS FROM", was);
      if (was != ev.accuracy) return 3;
    }
    return 0;
  } catch (const std::exception& e) {
    spdlog::error("{}", one_line(e));
    return 1;
  }
}
