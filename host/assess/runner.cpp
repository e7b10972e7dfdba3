#include "assess/runner.h"

#include "formats/safetensors.h"
#include "runtime/plugin_registry.h"
#include "train/progress.h"

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace tessera {
namespace fs = std::filesystem;
namespace {

struct Child {
  int status = 0;
  double wall_seconds = 0, peak_rss_mib = 0;
  bool ok() const { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }
  std::string how() const {
    if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
    return "exit status " + std::to_string(WEXITSTATUS(status));
  }
};

// Runs argv with stdout into `out` and stderr into `err` (both truncated), and waits. The
// child dies with this process (PR_SET_PDEATHSIG): an interrupted matrix leaves no run behind.
Child spawn(const std::vector<std::string>& argv, const std::string& out, const std::string& err) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const int out_fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644), err_fd = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0 || err_fd < 0) throw std::runtime_error("cannot write " + (out_fd < 0 ? out : err) + ": " + std::strerror(errno));
  const pid_t parent = ::getpid();
  const auto start = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {  // only async-signal-safe calls until exec
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(127);  // the parent died before the line above
    ::dup2(out_fd, STDOUT_FILENO), ::dup2(err_fd, STDERR_FILENO);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::close(out_fd), ::close(err_fd);
  if (pid < 0) throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(errno));
  Child c;
  rusage usage{};
  while (wait4(pid, &c.status, 0, &usage) < 0)
    if (errno != EINTR) throw std::runtime_error("waiting for " + argv[0] + ": " + std::strerror(errno));
  c.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // KiB on Linux; from fork on, so at least this process's own peak: a training run reports its
  // own (result.json's peak_rss_mib, VmHWM), which the record keeps instead.
  c.peak_rss_mib = static_cast<double>(usage.ru_maxrss) / 1024.0;
  return c;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::uintmax_t folder_bytes(const fs::path& dir) {
  std::uintmax_t n = 0;
  if (fs::exists(dir))
    for (const auto& e : fs::recursive_directory_iterator(dir))
      if (e.is_regular_file()) n += e.file_size();
  return n;
}

// The training loss of every step, from the run's metrics.jsonl.
nlohmann::json loss_curve(const fs::path& metrics) {
  nlohmann::json curve = nlohmann::json::array();
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("event", "") == "step") curve.push_back({j["step"], j["loss"]});
  }
  return curve;
}

// `tessera eval RUN --json [--merge]`: its JSON line, or {"error": why}.
nlohmann::json evaluate_run(const RunnerOptions& o, const fs::path& run, bool merge) {
  std::vector<std::string> argv = o.tessera;
  for (const char* a : {"eval", "--json"}) argv.emplace_back(a);
  argv.push_back(run.string());
  if (merge) argv.emplace_back("--merge");
  const std::string out = run.string() + (merge ? ".eval-merged.json" : ".eval.json"), err = run.string() + (merge ? ".eval-merged.log" : ".eval.log");
  const Child c = spawn(argv, out, err);
  if (!c.ok()) return {{"error", reason_from_log(err)}};
  const auto j = nlohmann::json::parse(read_text(out), nullptr, false);
  return j.is_discarded() ? nlohmann::json{{"error", "eval printed no JSON (" + out + ")"}} : j;
}

nlohmann::json run_one(const Setup& s, std::int64_t seed, const Matrix& m, const RunnerOptions& o) {
  const fs::path dir = fs::path(m.out) / s.name, run = dir / ("seed-" + std::to_string(seed));
  nlohmann::json plugins = nlohmann::json::array();
  for (const auto& method : s.config.methods) plugins.push_back(method.plugin);
  nlohmann::json r = {{"setup", s.name}, {"seed", seed}, {"dir", run.string()}, {"ok", false}, {"plugins", plugins}};
  if (!s.error.empty()) return r["error"] = s.error, r;
  fs::create_directories(dir);
  const Config run_cfg = run_config(s, seed, run.string());
  const std::string config_text = resolved_toml(run_cfg);
  const fs::path record = run.string() + ".json", config = run.string() + ".toml", log = run.string() + ".log";
  if (!o.rerun && fs::exists(record)) {
    const auto done = nlohmann::json::parse(read_text(record.string()), nullptr, false);
    // Finished with the same config (a host key or plugin parameter added since, at its
    // default, is the same): kept.
    auto same = [&] {
      try {
        return config_differences(done.value("config", ""), run_cfg).empty();
      } catch (const std::exception&) {
        return false;  // a record whose config no longer parses: run again
      }
    };
    if (!done.is_discarded() && done.contains("config") && same()) return done;
  }
  fs::remove(record);  // before the run folder is cleared: a record names a run that is there
  write_file_atomic(config.string(), config_text);
  std::vector<std::string> argv = o.tessera;
  for (const std::string& a : std::initializer_list<std::string>{"train", config.string(), "--run-dir", run.string(), "--overwrite"}) argv.push_back(a);
  const Child c = spawn(argv, log.string() + ".out", log.string());
  r["wall_seconds"] = c.wall_seconds, r["peak_rss_mib"] = c.peak_rss_mib;
  r["log"] = log.string();
  if (!c.ok()) return r["error"] = reason_from_log(log.string()) + " (" + c.how() + ")", r;
  r["result"] = nlohmann::json::parse(read_text((run / "result.json").string()));
  if (r["result"].contains("peak_rss_mib")) r["peak_rss_mib"] = r["result"]["peak_rss_mib"];
  r["loss_curve"] = loss_curve(run / "metrics.jsonl");
  r["adapter_bytes"] = folder_bytes(run / "adapter");
  r["eval"] = evaluate_run(o, run, false);
  const auto merged = evaluate_run(o, run, true);
  if (merged.contains("error")) r["merge_error"] = merged["error"];
  else r["eval_merged"] = merged;
  if (r["eval"].contains("error")) return r["error"] = "evaluating the saved adapter: " + r["eval"]["error"].get<std::string>(), r;
  r["ok"] = true;
  r["config"] = config_text;
  write_file_atomic(record.string(), r.dump(1) + "\n");
  return r;
}

std::string fmt_running(const std::string& setup, std::int64_t seed, std::int64_t failed) {
  return setup + ", seed " + std::to_string(seed) + (failed ? " (" + std::to_string(failed) + " failed so far)" : std::string());
}

}  // namespace

nlohmann::json run_peers(const std::string& out) {
  const char* venv = std::getenv("TESSERA_VENV");
  const fs::path script = fs::path(TESSERA_SOURCE_DIR) / "bench" / "assess_peers.py";
  if (venv == nullptr || !fs::exists(script)) {
    spdlog::warn("--peers needs the source tree's {} and $TESSERA_VENV (source scripts/bootstrap's env.sh): no peer column", script.string());
    return nullptr;
  }
  spdlog::info("running the peer libraries' side (log: {})", (fs::path(out) / "peers.log").string());
  const Child c = spawn({(fs::path(venv) / "bin" / "python").string(), script.string(), out}, (fs::path(out) / "peers.out").string(),
                        (fs::path(out) / "peers.log").string());
  if (!c.ok()) spdlog::warn("the peer runner failed ({}): {}", c.how(), reason_from_log((fs::path(out) / "peers.log").string()));
  const fs::path file = fs::path(out) / "peers.json";
  if (!fs::exists(file)) return nullptr;
  const auto j = nlohmann::json::parse(read_text(file.string()), nullptr, false);
  return j.is_discarded() ? nlohmann::json() : j;
}

std::string reason_from_log(const std::string& log) {
  std::ifstream in(log);
  std::string line, last, error;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    last = line;
    const auto at = line.find("[error] ");
    if (at != std::string::npos) error = line.substr(at + 8);
  }
  return !error.empty() ? error : !last.empty() ? last : "no output (" + log + ")";
}

nlohmann::json run_matrix(const Matrix& m, const RunnerOptions& o) {
  nlohmann::json records = nlohmann::json::array();
  Progress bar("assess", static_cast<std::int64_t>(m.runs()));
  std::int64_t done = 0, failed = 0;
  for (const auto& s : m.setups)
    for (const auto seed : s.seeds) {
      bar.update(done, fmt_running(s.name, seed, failed));
      try {
        records.push_back(run_one(s, seed, m, o));
      } catch (const std::exception& e) {  // a file that cannot be written or read back: this row's failure only
        records.push_back({{"setup", s.name}, {"seed", seed}, {"ok", false}, {"error", one_line(e)}});
      }
      if (!records.back()["ok"].get<bool>()) {
        ++failed;
        spdlog::warn("{} (seed {}) failed: {}", s.name, seed, records.back()["error"].get<std::string>());
      }
      ++done;
    }
  bar.update(done, failed ? std::to_string(failed) + " failed" : std::string("every run finished"));
  bar.finish();
  return records;
}

}  // namespace tessera
