// `tessera assess`'s table and report: the records of every run (assess/runner.h)
// aggregated per setup — the task metric's mean and spread over seeds, trainable share, peak
// RSS, training examples/s and tokens/s, evaluation examples/s unmerged and merged, adapter
// size, wall time, training FLOP/s as a share of the machine's measured dense-product peak —
// written as results.json, report.md and a self-contained report.html (inline SVG: the
// training-loss curves, the metric against trainable share and against peak memory; no
// script, nothing fetched).
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace tessera {

// One row per setup, in matrix order. `machine` holds at least "peak_flops" (the dense
// product's FLOP/s measured in this run; 0: unknown). `peers`: bench/assess_peers.py's
// peers.json (setup -> the peer library's accuracy, examples/s and peak RSS, or why none), or null.
nlohmann::json aggregate(const nlohmann::json& records, const nlohmann::json& machine, const nlohmann::json& peers = nullptr);

// The task metric's direction: perplexity and loss fall as a model gets better.
bool lower_is_better(const std::string& metric);

std::string report_markdown(const nlohmann::json& rows, const nlohmann::json& machine);
std::string report_html(const nlohmann::json& rows, const nlohmann::json& records, const nlohmann::json& machine);

}  // namespace tessera
