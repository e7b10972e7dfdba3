// `tessera eval RUN_DIR`: reloads the base model and the run's adapter, evaluates the
// test split, and compares the accuracy with the one recorded at training time (exit 3
// when it differs). --merge folds the methods into the weights first; --json prints the
// result as one JSON line with the evaluation's examples/s (`tessera assess` reads it).
#include "cli/commands.h"
#include "cli/switches.h"

#include "formats/json_file.h"
#include "train/session.h"
#include "train/trainer.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>

namespace tessera {
namespace fs = std::filesystem;
namespace {

struct Args {
  std::string run_dir;
  std::int64_t threads = -1;
  bool merge = false, json = false;
  Switches switches;
};

// 0 when result.json's test_accuracy is the one measured now (or there is none), else 3; the
// verdict goes to `say` (stderr under --json, whose stdout is the JSON line alone).
int compare_recorded(const std::string& run_dir, double accuracy, std::FILE* say) {
  const std::string recorded = (fs::path(run_dir) / "result.json").string();
  if (!fs::exists(recorded)) return 0;
  const auto j = read_json_file(recorded);
  const JsonFields f(j, recorded);
  if (!f.has("test_accuracy")) {
    std::fprintf(say, "%s records no test accuracy to compare with\n", recorded.c_str());
    return 0;
  }
  const double was = f.number_or("test_accuracy", 0);
  std::fprintf(say, "%s the accuracy recorded at training time (%.4f)\n", was == accuracy ? "reproduces" : "DIFFERS FROM", was);
  return was == accuracy ? 0 : 3;
}

int run_eval(const Args& a, const PluginRegistry& registry) {
  Config config = load_run_config(a.run_dir, registry);
  if (a.threads >= 0) config.train.threads = a.threads;
  set_threads(config.train.threads);
  Session session(config, registry);
  session.load_adapter((fs::path(a.run_dir) / "adapter").string());
  a.switches.apply(session.methods());
  if (a.merge) session.methods().merge();  // refused, naming the instance, for one that cannot fold
  const auto start = std::chrono::steady_clock::now();
  const EvalResult ev = evaluate(session, Split::Test);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (a.json) {  // a report's line: the numbers, and whether they reproduce training's, never an exit status
    nlohmann::json j = {{"examples", ev.examples}, {"seconds", seconds}, {"examples_per_s", static_cast<double>(ev.examples) / seconds}, {"merged", a.merge}};
    if (!a.switches.any() && !a.merge) j["reproduces"] = compare_recorded(a.run_dir, ev.accuracy, stderr) == 0;
    for (const auto& m : session.task().metrics(ev)) j[m.key] = m.value;
    std::printf("%s\n", j.dump().c_str());
  } else {
    for (const auto& m : session.task().metrics(ev)) std::printf("%s %.6g; ", m.label.c_str(), m.value);
    std::printf("on %lld examples (%.1f examples/s%s)\n", static_cast<long long>(ev.examples), static_cast<double>(ev.examples) / seconds, a.merge ? ", merged" : "");
  }
  // Another model than the one trained (switches), or the same folded into the weights
  // (merge: equal to rounding, not bit for bit): nothing to compare with exactly.
  if (a.switches.any() || a.merge || a.json) return 0;
  return compare_recorded(a.run_dir, ev.accuracy, a.json ? stderr : stdout);
}

}  // namespace

Command eval_command() {
  auto a = std::make_shared<Args>();
  return {"eval", "reload base + adapter of a run and evaluate its test split",
          [a](CLI::App& c) {
            c.add_option("run_dir", a->run_dir, "run directory written by `tessera train`")->required()->check(CLI::ExistingDirectory);
            c.add_option("--threads", a->threads, "override [train] threads")->check(CLI::Range(0, 4096));
            c.add_flag("--merge", a->merge, "fold every method into the weights first (refused for one that cannot be folded)");
            c.add_flag("--json", a->json, "print one JSON line: the metrics, examples, seconds and examples/s of the evaluation");
            a->switches.add_options(c);
          },
          [a](const PluginRegistry& r) { return run_eval(*a, r); }};
}

}  // namespace tessera
