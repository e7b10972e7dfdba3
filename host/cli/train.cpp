// `tessera train CONFIG`: fine-tunes as the config says and writes the run directory —
// config.toml (resolved), metrics.jsonl, the adapter after each epoch, checkpoints/,
// result.json and report.md. `tessera train --resume RUN [CONFIG]` continues a run from its
// newest checkpoint (train/resume.h).
#include "cli/commands.h"
#include "cli/launch.h"

#include "formats/safetensors.h"
#include "runtime/device.h"
#include "train/distributed.h"
#include "train/progress.h"
#include "train/resume.h"
#include "train/run_dir.h"
#include "train/session.h"
#include "train/trainer.h"

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

namespace tessera {
namespace fs = std::filesystem;
namespace {

struct Args {
  std::string config, run_dir, resume;
  std::int64_t threads = -1, nproc = 1;
  bool overwrite = false, tensorboard = false;
};

std::string report(const Config& c, const Session& s, const TrainResult& r) {
  std::ostringstream o;
  o << "# Tessera run\n\n"
    << "- config: `" << c.file << "`\n- model: `" << c.model.path << "` (" << c.model.dtype << ", " << c.model.device << ")\n"
    << "- task: " << c.task.kind << "\n- data: `" << c.data.path << "`, labels:";
  for (const auto& l : s.data().label_names) o << " `" << l << "`";
  o << "\n- methods:";
  if (c.methods.empty()) o << " none (task head only)";
  for (const auto& m : c.methods) o << " `" << m.name << "` (" << m.plugin << ")";
  o << "\n\n| metric | value |\n|---|---|\n";
  for (const auto& m : s.task().metrics(r.test)) o << "| " << m.label << " | " << m.value << " |\n";
  o << "| trainable parameters | " << r.trainable << " (" << 100.0 * static_cast<double>(r.trainable) / static_cast<double>(r.base) << "% of " << r.base << ") |\n"
    << "| optimizer steps | " << r.steps << " |\n| wall time | " << format_duration(r.seconds) << " |\n"
    << "| examples/s (training) | " << r.examples_per_s << " |\n| tokens/s (training) | " << r.tokens_per_s << " |\n"
    << "| examples/s (evaluation) | " << r.eval_examples_per_s << " |\n";
  if (r.ranks > 1)
    o << "| data-parallel ranks | " << r.ranks << " (gradients all-reduced: " << r.allreduce_bytes_per_step << " bytes, "
      << 1e3 * r.allreduce_seconds_per_step << " ms per step outside backward; " << 100 * r.allreduce_overlapped << "% of the buckets started before it ended) |\n";
  return o.str();
}

// This process's peak resident set (VmHWM, MiB): its own from exec on, unlike a parent's
// ru_maxrss of a spawned child, which starts from the parent's high-water mark.
double peak_rss_mib() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // "VmHWM:  123456 kB"
  return 0.0;
}

void write_results(const Config& config, const Session& s, const TrainResult& r, const std::string& run_dir) {
  nlohmann::json result = {{"test_examples", r.test.examples}, {"task", config.task.kind}, {"trainable_parameters", r.trainable},
                           {"base_parameters", r.base}, {"steps", r.steps}, {"seconds", r.seconds}, {"examples_per_s", r.examples_per_s},
                           {"tokens_per_s", r.tokens_per_s}, {"eval_examples_per_s", r.eval_examples_per_s}, {"matmul_parameters", r.matmul_parameters},
                           {"peak_rss_mib", peak_rss_mib()}};
  if (r.ranks > 1)
    result["data_parallel"] = {{"ranks", r.ranks}, {"allreduce_bytes_per_step", r.allreduce_bytes_per_step},
                               {"allreduce_seconds_per_step", r.allreduce_seconds_per_step}, {"allreduce_overlapped", r.allreduce_overlapped},
                               {"unused_tensors_per_step", r.unused_per_step}, {"graph_walk_seconds_per_step", r.graph_walk_seconds_per_step}};
  std::string line;
  const auto metrics = s.task().metrics(r.test);
  if (!metrics.empty()) result["metric"] = metrics.front().key;  // the task's headline metric
  for (const auto& m : metrics) {
    result["test_" + m.key] = m.count ? nlohmann::json(static_cast<std::int64_t>(m.value)) : nlohmann::json(m.value);
    line += fmt::format("{} {:.6g}; ", m.label, m.value);
  }
  write_file_atomic((fs::path(run_dir) / "result.json").string(), result.dump(2) + "\n");
  write_file_atomic((fs::path(run_dir) / "report.md").string(), report(config, s, r));
  std::printf("%son %lld examples; trainable %.3f%% of the base; %s wall; run directory %s\n", line.c_str(), static_cast<long long>(r.test.examples),
              100.0 * static_cast<double>(r.trainable) / static_cast<double>(r.base), format_duration(r.seconds).c_str(), run_dir.c_str());
}

// Keys a resumed run may change: how long it runs, how often it checkpoints, how its batches
// are cut into buckets and micro-batches and the order their sums are added in (the same
// update; the ranks' number may change too),
// and where the run directory was named from. Anything else would not be the run the
// checkpoint is of.
bool may_change_on_resume(const std::string& difference) {
  for (const char* key : {"train.epochs:", "train.checkpoint_every:", "train.bucket_cap_mb:", "train.micro_batches:", "train.ordered_reduction:", "output.dir:"})
    if (difference.rfind(key, 0) == 0) return true;
  return false;
}

int run_resume(const Args& a, const PluginRegistry& registry) {
  const std::string& run_dir = a.resume;
  const auto checkpoint = newest_checkpoint(run_dir);
  if (!checkpoint)
    throw std::runtime_error(run_dir + " holds no complete checkpoint to resume from (" + (fs::path(run_dir) / "checkpoints").string() +
                             "/step-N: [train] checkpoint_every, or the end of an epoch, writes one)");
  Config config = load_config(a.config.empty() ? (fs::path(run_dir) / "config.toml").string() : a.config);
  check_methods(config, registry);
  if (a.threads >= 0) config.train.threads = a.threads;
  config.output_dir = run_dir;
  for (const auto& d : config_differences(checkpoint->config, config))
    if (!may_change_on_resume(d))
      throw std::runtime_error("--resume " + run_dir + ": the config changed since the checkpoint (" + d +
                               "); only [train] epochs, checkpoint_every, bucket_cap_mb, micro_batches and ordered_reduction may change when a run resumes");
  set_threads(config.train.threads);
  Session session(config, registry);
  const auto dp = DataParallel::from_environment(rank_device(config.model.device));
  const bool lead = dp == nullptr || dp->rank() == 0;
  if (lead) write_file_atomic((fs::path(run_dir) / "config.toml").string(), resolved_toml(config));
  const TrainResult r = train(session, run_dir, {&*checkpoint, dp.get(), a.tensorboard});
  if (lead) write_results(config, session, r, run_dir);
  return 0;
}

// Ranks after 0 of a data-parallel run: the same session and training, no writes (rank 0
// checked and cleared the run directory).
int run_follower(const Args& a, const PluginRegistry& registry) {
  Config config = load_config(a.config);
  check_methods(config, registry);
  if (a.threads >= 0) config.train.threads = a.threads;
  set_threads(config.train.threads);
  const std::string run_dir = a.run_dir.empty() ? config.output_dir : a.run_dir;
  config.output_dir = run_dir;
  Session session(config, registry);
  const auto dp = DataParallel::from_environment(rank_device(config.model.device));
  train(session, run_dir, {nullptr, dp.get(), false});
  return 0;
}

// A data-parallel rank other than 0 writes nothing, and says only warnings.
bool follower() {
  const char* rank = std::getenv("RANK");
  const char* world = std::getenv("WORLD_SIZE");
  return rank != nullptr && world != nullptr && std::string(world) != "1" && std::string(rank) != "0";
}

int run_train(const Args& a, const PluginRegistry& registry) {
  if (a.nproc > 1 && std::getenv("WORLD_SIZE") == nullptr) return launch_ranks(a.nproc, command_line());
  if (follower()) spdlog::set_level(std::max(spdlog::get_level(), spdlog::level::warn));
  if (!a.resume.empty()) return run_resume(a, registry);
  if (a.config.empty()) throw std::runtime_error("train: name a config (or --resume RUN)");
  if (follower()) return run_follower(a, registry);
  Config config = load_config(a.config);
  check_methods(config, registry);
  if (a.threads >= 0) config.train.threads = a.threads;
  set_threads(config.train.threads);
  const std::string run_dir = a.run_dir.empty() ? config.output_dir : a.run_dir;
  const auto earlier = earlier_run_entries(run_dir);
  if (!earlier.empty() && !a.overwrite) {
    std::string list;
    for (const auto& e : earlier) list += (list.empty() ? "" : ", ") + e;
    throw std::runtime_error(run_dir + " holds an earlier run (" + list + "): pass --overwrite to replace it, or --run-dir to write this one elsewhere");
  }
  config.output_dir = run_dir;
  // Model, data and methods load before anything of an earlier run is touched: a
  // mistake in this config leaves that run whole.
  Session session(config, registry);
  if (!earlier.empty()) {
    spdlog::info("replacing the earlier run in {}", run_dir);
    clear_earlier_run(run_dir);
  }
  fs::create_directories(run_dir);
  write_file_atomic((fs::path(run_dir) / "config.toml").string(), resolved_toml(config));
  const auto dp = DataParallel::from_environment(rank_device(config.model.device));  // rank 0 of several: the others wait here for it
  write_results(config, session, train(session, run_dir, {nullptr, dp.get(), a.tensorboard}), run_dir);
  return 0;
}

}  // namespace

Command train_command() {
  auto a = std::make_shared<Args>();
  return {"train", "fine-tune as a config file says",
          [a](CLI::App& c) {
            c.add_option("config", a->config, "TOML config (with --resume: the run's own config.toml when left out)");
            c.add_option("--resume", a->resume, "continue the run in this directory from its newest checkpoint");
            c.add_flag("--tensorboard", a->tensorboard, "also write TensorBoard event files (RUN/tensorboard/): train/loss, train/lr, test/<metric>");
            c.add_option("--nproc", a->nproc, "data-parallel: start this many local ranks (c10d: Gloo on CPU, NCCL on CUDA, one GPU a rank), as torchrun would; each trains on its share of every batch")
                ->check(CLI::Range(1, 1024));
            c.add_option("--run-dir", a->run_dir, "run directory (default: [output] dir)");
            c.add_option("--threads", a->threads, "override [train] threads")->check(CLI::Range(0, 4096));
            c.add_flag("--overwrite", a->overwrite, "replace an earlier run in the run directory (refused without it)");
          },
          [a](const PluginRegistry& r) { return run_train(*a, r); }};
}

}  // namespace tessera
