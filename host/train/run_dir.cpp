#include "train/run_dir.h"

#include <filesystem>

namespace tessera {
namespace fs = std::filesystem;

namespace {
constexpr const char* kFiles[] = {"config.toml", "metrics.jsonl", "result.json", "report.md"};
}

std::vector<std::string> earlier_run_entries(const std::string& dir) {
  std::vector<std::string> found;
  for (const char* f : kFiles)
    if (fs::exists(fs::path(dir) / f)) found.emplace_back(f);
  if (fs::exists(fs::path(dir) / "adapter")) found.emplace_back("adapter/");
  if (fs::exists(fs::path(dir) / "checkpoints")) found.emplace_back("checkpoints/");
  if (fs::exists(fs::path(dir) / "tensorboard")) found.emplace_back("tensorboard/");
  return found;
}

void clear_earlier_run(const std::string& dir) {
  for (const char* f : kFiles) fs::remove(fs::path(dir) / f);
  for (const char* d : {"adapter", "adapter.partial", "adapter.old", "checkpoints", "tensorboard"}) fs::remove_all(fs::path(dir) / d);
}

void replace_folder(const std::string& dir, const std::function<void(const std::string& partial)>& fill) {
  const fs::path target(dir), partial(dir + ".partial"), old(dir + ".old");
  fs::remove_all(partial);
  fs::create_directories(partial);
  try {
    fill(partial.string());
  } catch (...) {
    std::error_code ignored;  // the error that matters is the one being thrown
    fs::remove_all(partial, ignored);
    throw;
  }
  // Two renames: between them `dir` is briefly absent, never half-written.
  fs::remove_all(old);
  if (fs::exists(target)) fs::rename(target, old);
  fs::rename(partial, target);
  fs::remove_all(old);
}

}  // namespace tessera
