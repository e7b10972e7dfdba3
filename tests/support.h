// Shared test helpers. Torch headers come first and Catch2 last, with every Catch2 macro
// prefixed (CATCH_CHECK …) so that no CHECK from a logging library can replace it.
#pragma once

#include "model/bert.h"
#include "model/safetensors.h"
#include "runtime/peft_import.h"
#include "runtime/plugin_registry.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdlib>
#include <unistd.h>
#include <filesystem>
#include <map>
#include <vector>
#include <string>

#define CATCH_CONFIG_PREFIX_ALL
#include <catch2/catch.hpp>

namespace tessera::test {

inline std::string model_dir() {
  const char* d = std::getenv("TESSERA_MODEL_DIR");
  if (d == nullptr) throw std::runtime_error("TESSERA_MODEL_DIR is not set: run scripts/bootstrap and source its env.sh");
  return d;
}

inline std::string decoder_dir() {  // the real SmolLM2-135M-Instruct the set-up converts
  const char* d = std::getenv("TESSERA_DECODER_DIR");
  if (d == nullptr) throw std::runtime_error("TESSERA_DECODER_DIR is not set: run scripts/bootstrap and source its env.sh");
  return d;
}

inline std::string fixture(const std::string& rel) { return std::string(TESSERA_FIXTURE_DIR) + "/" + rel; }

// The device the model tests run on: TESSERA_TEST_DEVICE ("cuda", "cuda:1" …), else the
// CPU. CI has no GPU; on a machine with one the same tests check that tensors follow the
// configured device (bench/device_check.sh runs them so). Tests tagged [minilm] read the
// real all-MiniLM-L6-v2 and [real] the real SmolLM2-135M: the GPU machine gets neither
// (too large to carry), so that run leaves them out.
inline c10::Device device() {
  const char* d = std::getenv("TESSERA_TEST_DEVICE");
  return c10::Device(d == nullptr || *d == '\0' ? "cpu" : d);
}

inline at::TensorOptions options(at::ScalarType dtype = at::kFloat) { return at::TensorOptions().dtype(dtype).device(device()); }

// Reference tensors, on the test device like the models they are compared with.
inline NamedTensors read_tensors(const std::string& path, c10::Device where = device()) {
  auto f = SafetensorsFile::open(path);
  NamedTensors out;
  for (const auto& n : f->names()) out[n] = f->tensor(n).to(where);
  return out;
}

// A reference file read once per test process.
inline NamedTensors& cached_tensors(const std::string& path) {
  static std::map<std::string, NamedTensors> cache;
  auto it = cache.find(path);
  if (it == cache.end()) it = cache.emplace(path, read_tensors(path)).first;
  return it->second;
}

inline double max_abs_diff(const Tensor& a, const Tensor& b) { return (a.to(at::kCPU, at::kDouble) - b.to(at::kCPU, at::kDouble)).abs().max().item<double>(); }

// Over real tokens only: hidden states at padding positions are nobody's output
// (transformers computes them anyway, Tessera skips them).
inline double max_abs_diff_tokens(const Tensor& a, const Tensor& b, const Tensor& mask) {  // (B, T, H), (B, T, H), (B, T)
  Tensor keep = mask.to(at::kBool);
  return max_abs_diff(a.index({keep}), b.index({keep}));
}

inline std::unique_ptr<BertModel> load_minilm() { return BertModel::load(model_dir(), options()); }

// A PEFT adapter directory attached to `model` with peft's tensors loaded, after checking
// that our state has exactly peft's keys and shapes.
inline std::unique_ptr<MethodInstance> attach_peft_adapter(const std::string& dir, ModelView& model);

// The registry of the in-tree plugins plus the test plugins.
inline PluginRegistry& registry() {
  static PluginRegistry r = [] {
    PluginRegistry reg;
    reg.scan({TESSERA_PLUGIN_DIR, TESSERA_TEST_PLUGIN_DIR});
    return reg;
  }();
  return r;
}

inline std::unique_ptr<MethodInstance> attach_peft_adapter(const std::string& dir, ModelView& model) {
  MethodConfig mc = method_from_peft_dir(dir, registry(), "adapter");
  auto inst = registry().create(mc.plugin, "adapter");
  AttachContext ctx{"adapter", mc.targets, mc.checked, model};
  inst->call("attach", [&](Method& m) { m.attach(ctx); });
  auto peft_tensors = read_tensors(dir + "/adapter_model.safetensors");
  auto ours = inst->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(ours.size() == peft_tensors.size());
  for (const auto& [k, t] : peft_tensors) CATCH_CHECK((ours.count(k) && ours[k].sizes() == t.sizes()));
  inst->call("load_state", [&](Method& m) { m.load_state(peft_tensors); });
  return inst;
}

// A fresh directory for this test process, removed when the process ends (ctest runs each
// test case in a process of its own, so nothing piles up in the temp directory).
inline std::filesystem::path temp_dir(const std::string& name) {
  struct Cleanup {
    std::vector<std::filesystem::path> dirs;
    ~Cleanup() {
      std::error_code ignored;
      for (const auto& d : dirs) std::filesystem::remove_all(d, ignored);
    }
  };
  static Cleanup made;
  auto p = std::filesystem::temp_directory_path() / ("tessera-test-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  made.dirs.push_back(p);
  return p;
}

}  // namespace tessera::test
