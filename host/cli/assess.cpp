// `tessera assess MATRIX`: the review's assessment table on the user's own model and data —
// every setup of a matrix (assess/matrix.h) trained with each seed on the same data, split,
// budget and threads, each in a process of its own (assess/runner.h), then one table and a
// report (assess/report.h): OUT/results.json, OUT/report.md (also printed), OUT/report.html.
// A finished run is not run again; a setup that fails has its row say why, the rest runs,
// and the exit status is 4.
#include "cli/commands.h"
#include "cli/launch.h"

#include "assess/machine.h"
#include "assess/matrix.h"
#include "assess/report.h"
#include "assess/runner.h"
#include "formats/safetensors.h"

#include <spdlog/spdlog.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

namespace tessera {
namespace fs = std::filesystem;
namespace {

struct Args {
  std::string matrix, out;
  bool rerun = false, check = false, peers = false;
};

// This binary with the global options it was given (plugin directories …), for the runs.
std::vector<std::string> child_prefix() {
  std::vector<std::string> argv = {fs::read_symlink("/proc/self/exe").string()};
  const auto& all = command_line();
  for (std::size_t i = 1; i < all.size() && all[i] != "assess"; ++i) argv.push_back(all[i]);
  return argv;
}

int run_assess(const Args& a, const PluginRegistry& registry) {
  Matrix m = load_matrix(a.matrix, registry);
  if (!a.out.empty()) m.out = a.out;
  if (a.check) {  // every setup built and its methods validated; nothing run
    int bad = 0;
    for (const auto& s : m.setups) {
      std::printf("%-16s %s\n", s.name.c_str(), s.error.empty() ? "ok" : s.error.c_str());
      bad += s.error.empty() ? 0 : 1;
    }
    return bad ? 4 : 0;
  }
  fs::create_directories(m.out);
  for (const auto& s : m.setups)
    if (!s.error.empty()) spdlog::warn("setup {} cannot run: {}", s.name, s.error);
  spdlog::info("assessing {} setups in {} runs into {}", m.setups.size(), m.runs(), m.out);
  const nlohmann::json machine = machine_info(m.base.train.threads);
  const nlohmann::json records = run_matrix(m, {child_prefix(), a.rerun});
  nlohmann::json kept = records;
  for (auto& r : kept) r.erase("config");  // each run's own .toml holds it
  const auto results = fs::path(m.out) / "results.json";
  auto write_results = [&](const nlohmann::json& rows) {
    write_file_atomic(results.string(), nlohmann::json{{"matrix", fs::absolute(m.file).string()}, {"machine", machine}, {"rows", rows}, {"runs", kept}}.dump(1) + "\n");
  };
  write_results(aggregate(records, machine));  // what the peer runner reads
  // The peer column: run now (--peers), or kept from an earlier call's peers.json.
  const auto peers_file = fs::path(m.out) / "peers.json";
  const nlohmann::json peers = a.peers ? run_peers(m.out) : fs::exists(peers_file) ? nlohmann::json::parse(std::ifstream(peers_file), nullptr, false) : nlohmann::json();
  const nlohmann::json rows = aggregate(records, machine, peers.is_discarded() ? nlohmann::json() : peers);
  write_results(rows);
  const std::string md = report_markdown(rows, machine);
  write_file_atomic((fs::path(m.out) / "report.md").string(), md);
  write_file_atomic((fs::path(m.out) / "report.html").string(), report_html(rows, records, machine));
  std::printf("%s\nreport: %s\n", md.c_str(), (fs::path(m.out) / "report.html").string().c_str());
  for (const auto& r : records)
    if (!r["ok"].get<bool>()) return 4;
  return 0;
}

}  // namespace

Command assess_command() {
  auto a = std::make_shared<Args>();
  return {"assess", "run every setup of a matrix on the same data and budget, and write the assessment table and report",
          [a](CLI::App& c) {
            c.add_option("matrix", a->matrix, "matrix TOML: base, seeds, [train], [[setups]]")->required()->check(CLI::ExistingFile);
            c.add_option("--out", a->out, "output directory (default: the matrix's out)");
            c.add_flag("--rerun", a->rerun, "run every setup again, finished or not");
            c.add_flag("--peers", a->peers, "also run the peer libraries (peft, AdapterHub's adapters) on the same task and seeds for the setups they have (bench/assess_peers.py)");
            c.add_flag("--check", a->check, "build every setup's config and validate its methods, run nothing (exit 4 when one fails)");
          },
          [a](const PluginRegistry& r) { return run_assess(*a, r); }};
}

}  // namespace tessera
