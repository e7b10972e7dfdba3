// Runs a matrix (assess/matrix.h): each setup with each seed as `tessera train` in a child
// process of its own — its peak RSS is that process's own (its VmHWM, in result.json), and a
// setup that fails or diverges ends its child, not the matrix — then `tessera eval --json`
// on the run unmerged and merged, timed. Each finished run leaves a record,
// OUT/<setup>/seed-<s>.json, and is not run again while its config stays the same.
#pragma once

#include "assess/matrix.h"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace tessera {

struct RunnerOptions {
  std::vector<std::string> tessera;  // a child's argv prefix: this binary and its global options
  bool rerun = false;                // run every setup again, finished or not
};

// One record per setup and seed, in matrix order: {"setup", "seed", "ok", "error", "dir",
// "log", "wall_seconds", "peak_rss_mib", "result" (the run's result.json), "eval", "eval_merged" or
// "merge_error", "adapter_bytes", "loss_curve" ([[step, loss] …])}.
nlohmann::json run_matrix(const Matrix& m, const RunnerOptions& o);

// The peer libraries' side (`--peers`): bench/assess_peers.py of this source tree, run by the
// venv's python ($TESSERA_VENV, set by scripts/bootstrap's env.sh) over OUT/results.json; it
// writes OUT/peers.json. Returns that file's contents (null when the script failed: said why).
nlohmann::json run_peers(const std::string& out);

// The last "[error]" line of a child's log (its one-line reason), or its last line.
std::string reason_from_log(const std::string& log);

}  // namespace tessera
