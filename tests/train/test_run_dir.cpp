// The run directory: what counts as an earlier run, what clearing it removes, and a
// folder replaced only once its successor is written in full.
#include "train/run_dir.h"

#include "support.h"

#include <fstream>
#include <stdexcept>

using namespace tessera;
namespace fs = std::filesystem;

namespace {
void touch(const fs::path& p) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << "x";
}
}  // namespace

CATCH_TEST_CASE("an earlier run is found by its entries, and clearing removes those alone", "[train][run_dir]") {
  const auto dir = test::temp_dir("run-dir");
  CATCH_CHECK(earlier_run_entries((dir / "absent").string()).empty());
  touch(dir / "notes.txt");  // the user's own file: neither a run nor removed
  CATCH_CHECK(earlier_run_entries(dir.string()).empty());
  touch(dir / "metrics.jsonl");
  touch(dir / "adapter" / "lora" / "adapter_model.safetensors");
  touch(dir / "adapter.partial" / "tessera.json");
  CATCH_CHECK(earlier_run_entries(dir.string()) == std::vector<std::string>{"metrics.jsonl", "adapter/"});
  clear_earlier_run(dir.string());
  CATCH_CHECK(earlier_run_entries(dir.string()).empty());
  CATCH_CHECK_FALSE(fs::exists(dir / "adapter.partial"));
  CATCH_CHECK(fs::exists(dir / "notes.txt"));
}

CATCH_TEST_CASE("a folder is replaced only when its successor is written in full", "[train][run_dir]") {
  const auto dir = test::temp_dir("replace-folder");
  const std::string target = (dir / "adapter").string();
  touch(dir / "adapter" / "old_method" / "a");
  // A failure while writing leaves the earlier folder as it was.
  CATCH_CHECK_THROWS_WITH(replace_folder(target, [](const std::string& out) {
                            touch(fs::path(out) / "new_method" / "a");
                            throw std::runtime_error("disk full");
                          }),
                          "disk full");
  CATCH_CHECK(fs::exists(dir / "adapter" / "old_method" / "a"));
  CATCH_CHECK_FALSE(fs::exists(dir / "adapter" / "new_method"));
  CATCH_CHECK_FALSE(fs::exists(dir / "adapter.partial"));
  // A success replaces it whole: nothing of the old layout lingers, no temporary is left.
  replace_folder(target, [](const std::string& out) { touch(fs::path(out) / "new_method" / "a"); });
  CATCH_CHECK(fs::exists(dir / "adapter" / "new_method" / "a"));
  CATCH_CHECK_FALSE(fs::exists(dir / "adapter" / "old_method"));
  CATCH_CHECK_FALSE(fs::exists(dir / "adapter.partial"));
  CATCH_CHECK_FALSE(fs::exists(dir / "adapter.old"));
}
