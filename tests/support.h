// Shared test helpers. Torch headers come first and Catch2 last, with every Catch2 macro
// prefixed (CATCH_CHECK …) so that no CHECK from a logging library can replace it.
#pragma once

#include "model/bert.h"
#include "model/safetensors.h"
#include "runtime/plugin_registry.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdlib>
#include <unistd.h>
#include <filesystem>
#include <string>

#define CATCH_CONFIG_PREFIX_ALL
#include <catch2/catch.hpp>

namespace tessera::test {

inline std::string model_dir() {
  const char* d = std::getenv("TESSERA_MODEL_DIR");
  if (d == nullptr) throw std::runtime_error("TESSERA_MODEL_DIR is not set: run scripts/bootstrap and source its env.sh");
  return d;
}

inline std::string fixture(const std::string& rel) { return std::string(TESSERA_FIXTURE_DIR) + "/" + rel; }

inline NamedTensors read_tensors(const std::string& path) {
  auto f = SafetensorsFile::open(path);
  NamedTensors out;
  for (const auto& n : f->names()) out[n] = f->tensor(n);
  return out;
}

inline double max_abs_diff(const Tensor& a, const Tensor& b) { return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>(); }

// Over real tokens only: hidden states at padding positions are nobody's output
// (transformers computes them anyway, Tessera skips them).
inline double max_abs_diff_tokens(const Tensor& a, const Tensor& b, const Tensor& mask) {  // (B, T, H), (B, T, H), (B, T)
  Tensor keep = mask.to(at::kBool);
  return max_abs_diff(a.index({keep}), b.index({keep}));
}

inline std::unique_ptr<BertModel> load_minilm() { return BertModel::load(model_dir(), at::TensorOptions().dtype(at::kFloat)); }

// The registry of the in-tree plugins plus the test plugins.
inline PluginRegistry& registry() {
  static PluginRegistry r = [] {
    PluginRegistry reg;
    reg.scan({TESSERA_PLUGIN_DIR, TESSERA_TEST_PLUGIN_DIR});
    return reg;
  }();
  return r;
}

inline std::filesystem::path temp_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("tessera-test-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

}  // namespace tessera::test
