// The run directory `tessera train` writes: config.toml, metrics.jsonl, adapter/,
// checkpoints/ (train/resume.h), result.json, report.md. A new run does not silently mix with, or replace, an earlier
// one: the CLI refuses a directory that holds a run unless told to overwrite, and then
// clears only these entries (never the directory itself, which may be the user's own).
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace tessera {

// The entries of an earlier run in `dir` ("adapter/" for the folder), in a fixed order;
// empty when there are none or `dir` does not exist.
std::vector<std::string> earlier_run_entries(const std::string& dir);

// Removes those entries (and an adapter folder a crash left half-written).
void clear_earlier_run(const std::string& dir);

// Writes a folder in full before it replaces `dir`: `fill` writes into a sibling
// `<dir>.partial`, which then takes `dir`'s place. A crash or an error while filling
// leaves the earlier `dir` as it was (an error removes the partial folder too).
void replace_folder(const std::string& dir, const std::function<void(const std::string& partial)>& fill);

}  // namespace tessera
