// Shared test helpers. Torch headers come first and Catch2 last, with every Catch2 macro
// prefixed (CATCH_CHECK …) so that no CHECK from a logging library can replace it.
#pragma once

#include "architectures/bert.h"
#include "formats/safetensors.h"
#include "runtime/peft_import.h"
#include "runtime/plugin_registry.h"
#include "test_paths.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdlib>
#include <fstream>
#include <ostream>
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

// An owner per name for interventions a test installs itself, as the host makes one per
// method instance (plugin id "test").
inline OwnerImpl& owner(const std::string& name) {
  static std::map<std::string, std::shared_ptr<OwnerImpl>> owners;
  auto& o = owners[name];
  if (!o) o = OwnerImpl::create("test", name);
  return *o;
}

// The Python with transformers and peft that tests run reference scripts with: the venv
// the build was configured with, or TESSERA_TEST_PYTHON (a GPU machine's own Python).
inline std::string python() {
  const char* p = std::getenv("TESSERA_TEST_PYTHON");
  return p != nullptr && *p != '\0' ? p : TESSERA_VENV_PYTHON;
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

// ---- Parity with an independent reference ------------------------------------------------
//
// How far two float32 implementations of one network may differ depends on the machine
// (oneDNN against MKL, AVX2 against AVX-512 kernels, thread counts: each sums in another
// order), so no absolute number is right everywhere. The fixture scripts therefore run the
// reference's forward twice on the same weights and inputs: in float32 (`key`) and in
// float64 (`key.f64`). The float64 output is the truth, and the reference's own float32
// error against it measures what float32 does to this computation on this machine.
// Tessera's float32 output passes when it is no further from the truth than a few times
// that — a max over elements is a noisy statistic: on the ill-conditioned T5 fixture MKL's
// reproducible path (MKL_CBWR=COMPATIBLE) lands 5.8 times closer than its default path and
// than Tessera — plus a floor of a few float32 steps of the output's size
// for outputs that float32 happens to get almost exactly (ε of the output's own type, so a
// bfloat16 run is held to a bfloat16 reference the same way):
//
//     max |ours − truth| ≤ kParityFactor · max |reference32 − truth| + kParityFloor · ε · max |truth|
//
// docs/testing.md says how the constants were chosen and what they were checked against.
constexpr double kEpsF32 = 1.1920928955078125e-7;  // 2^-23
constexpr double kParityFactor = 8.0;
constexpr double kParityFloor = 16.0;

// The distance from 1 to the next larger number of the output's type.
inline double epsilon(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return 0.0078125;       // 2^-7
    case at::kHalf: return 0.0009765625;        // 2^-10
    case at::kDouble: return 2.220446049250313e-16;
    default: return kEpsF32;
  }
}

struct Parity {
  std::string what;
  double error = 0;      // max |ours − truth|
  double reference = 0;  // max |reference32 − truth|: the reference library's own float32 error
  double scale = 0;      // max |truth|
  double tolerance = 0;
  bool ok() const { return error <= tolerance; }
};

inline std::ostream& operator<<(std::ostream& o, const Parity& p) {
  return o << p.what << ": max |ours - truth| " << p.error << ", tolerance " << p.tolerance << " (the reference's own error "
           << p.reference << ", values up to " << p.scale << ")";
}

inline Tensor real_tokens(const Tensor& x, const Tensor& mask) { return mask.defined() ? x.index({mask.to(x.device(), at::kBool)}) : x; }

// ours against reference tensors f32 and f64 of the same computation; with a (B, T) mask,
// over real tokens only (hidden states at padding positions are nobody's output).
inline Parity parity(const std::string& what, const Tensor& ours, const Tensor& f32, const Tensor& f64, const Tensor& mask = {},
                     double floor_steps = kParityFloor) {
  const Tensor truth = real_tokens(f64.to(at::kCPU, at::kDouble), mask.defined() ? mask.cpu() : mask);
  const Tensor a = real_tokens(ours.to(at::kCPU, at::kDouble), mask.defined() ? mask.cpu() : mask);
  const Tensor r = real_tokens(f32.to(at::kCPU, at::kDouble), mask.defined() ? mask.cpu() : mask);
  Parity p;
  p.what = what;
  p.error = (a - truth).abs().max().item<double>();
  p.reference = (r - truth).abs().max().item<double>();
  p.scale = truth.abs().max().item<double>();
  p.tolerance = kParityFactor * p.reference + floor_steps * epsilon(ours.scalar_type()) * p.scale;
  return p;
}

// The same with the reference read from a fixture file: ref[key] and ref[key + ".f64"].
inline Parity parity(const Tensor& ours, const NamedTensors& ref, const std::string& key, const Tensor& mask = {}) {
  return parity(key, ours, ref.at(key), ref.at(key + ".f64"), mask);
}

// A float32 scalar (a loss) against the reference's float32 and float64 values, (1) each.
inline Parity parity(const std::string& what, double ours, const Tensor& f32, const Tensor& f64) {
  return parity(what, at::full({1}, ours, at::TensorOptions().dtype(at::kFloat)), f32, f64);
}

// The same with the reference scalar from a fixture file: ref[key] and ref[key + ".f64"].
inline Parity parity(const std::string& what, double ours, const NamedTensors& ref, const std::string& key) {
  return parity(what, ours, ref.at(key), ref.at(key + ".f64"));
}

// Checks one parity in the current test case, saying all of its numbers when it fails.
#define TESSERA_CHECK_PARITY(...)                    \
  do {                                               \
    const ::tessera::test::Parity p_ = (__VA_ARGS__); \
    CATCH_INFO(p_);                                  \
    CATCH_CHECK(p_.ok());                            \
  } while (false)

// ---- Against a float64 formula -----------------------------------------------------------
//
// A float32 dot product of length K, summed in any order, with or without fused
// multiply-adds, lands within γ_K · Σ|a_k||b_k| of the exact value, γ_K = Kε/(1 − Kε)
// (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1). A product checked
// against its float64 formula therefore has an elementwise bound that holds on every
// kernel and instruction set: |ours − exact| ≤ γ_K · (|A| |B|), the product of the
// magnitudes in float64.
inline double gamma(std::int64_t k, double eps = kEpsF32) { return static_cast<double>(k) * eps / (1 - static_cast<double>(k) * eps); }

// The largest |ours − exact| / bound over elements: at most 1 passes, and how far below 1
// says how much room the worst element leaves.
inline double bound_ratio(const Tensor& ours, const Tensor& exact, const Tensor& bound) {
  return ((ours.to(at::kCPU, at::kDouble) - exact.to(at::kCPU, at::kDouble)).abs() / bound.to(at::kCPU, at::kDouble)).max().item<double>();
}

// Proof that the parity tests can fail: with TESSERA_TEST_PERTURB set, every model a parity
// test loads has one weight scaled by (1 + 1e-3) — layer 0's MLP down projection, a weight
// whose every entry reaches the output — and each parity test must then fail
// (tests/parity_can_fail.sh runs them so).
inline void perturb_if_asked(ModelView& model) {
  const char* on = std::getenv("TESSERA_TEST_PERTURB");
  if (on == nullptr || *on == '\0') return;
  for (ParameterSite* p : model.parameter_sites()) {
    const std::string& n = p->name();
    const std::string suffix = "layers.0.mlp.down.weight";  // T5's first is the encoder's
    if (n.size() < suffix.size() || n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    Tensor w = p->base();
    p->add_delta(owner("perturbation"), [w] { return w * 1e-3; });
    return;
  }
  throw std::runtime_error("TESSERA_TEST_PERTURB: no weight named layers.0.…mlp.down.weight in this model");
}

inline std::unique_ptr<BertModel> load_minilm() {
  auto m = BertModel::load(model_dir(), options());
  perturb_if_asked(*m);
  return m;
}

// A PEFT adapter directory attached to `model` with peft's tensors loaded, after checking
// that our state has exactly peft's keys and shapes.
inline std::unique_ptr<MethodInstance> attach_peft_adapter(const std::string& dir, ModelView& model);

// The registry of the in-tree plugins plus the test plugins.
inline PluginRegistry& registry() {
  static PluginRegistry r = [] {
    PluginRegistry reg;
    reg.scan({TESSERA_PLUGIN_DIR, TESSERA_TEST_PLUGIN_DIR, TESSERA_EXAMPLE_PLUGIN_DIR});
    return reg;
  }();
  return r;
}

inline std::unique_ptr<MethodInstance> attach_peft_adapter(const std::string& dir, ModelView& model) {
  MethodConfig mc = method_from_peft_dir(dir, registry(), "adapter");
  auto inst = registry().create(mc.plugin, "adapter");
  inst->attach(model, mc.targets, mc.checked);
  auto peft_tensors = read_tensors(dir + "/adapter_model.safetensors");
  auto ours = inst->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(ours.size() == peft_tensors.size());
  for (const auto& [k, t] : peft_tensors) CATCH_CHECK((ours.count(k) && ours[k].sizes() == t.sizes()));
  inst->call("load_state", [&](Method& m) { m.load_state(peft_tensors); });
  return inst;
}

// peft's outputs for `variant` (make_fixtures.py's peft_reference: ref[variant + ".hidden"],
// ref[variant + ".merged_hidden"]) from the method `inst` attached to `model`: unmerged, merged
// and unmerged again, the unmerged output well off the base's.
template <class Model>
void check_merge_parity(MethodInstance& inst, Model& model, NamedTensors& ref, const std::string& variant) {
  at::NoGradGuard no_grad;
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  const Tensor unmerged = model.forward(ids, mask).hidden;
  TESSERA_CHECK_PARITY(parity(unmerged, ref, variant + ".hidden", mask));
  CATCH_CHECK(max_abs_diff_tokens(unmerged, ref["hidden"], mask) > 1e-2);  // the adapter really changes the output
  inst.call("merge", [](Method& m) { m.merge(); });
  // peft's merged model against the truth, which merging leaves as it was (make_fixtures.py).
  TESSERA_CHECK_PARITY(parity(model.forward(ids, mask).hidden, ref, variant + ".merged_hidden", mask));
  inst.call("unmerge", [](Method& m) { m.unmerge(); });
  TESSERA_CHECK_PARITY(parity(model.forward(ids, mask).hidden, ref, variant + ".hidden", mask));
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

// What peft computes with the adapter folder `inst` writes (its adapter_config.json and
// state, in a fresh directory returned through `dir`): PeftModel.from_pretrained over the
// model in model_dir (tests/fixtures/peft_load_forward.py; kind encoder, causal or t5) on
// the reference file's inputs. Returns its "out" and "out.f64".
inline NamedTensors peft_outputs(MethodInstance& inst, const std::string& kind, const std::string& model_dir, const std::string& reference,
                                 std::filesystem::path* dir = nullptr) {
  const auto where = temp_dir(inst.plugin_id() + "-peft");
  if (dir != nullptr) *dir = where;
  std::ofstream(where / "adapter_config.json") << inst.call("cfg", [](Method& m) { return m.adapter_config_json(); });
  save_safetensors((where / "adapter_model.safetensors").string(), inst.call("state", [](Method& m) { return m.state(); }));
  const std::string out = (where / "peft.safetensors").string();
  const std::string cmd = python() + " " + TESSERA_SOURCE_DIR + "/tests/fixtures/peft_load_forward.py " + kind + " " + model_dir + " " +
                          where.string() + " " + reference + " " + out;
  CATCH_REQUIRE(std::system(cmd.c_str()) == 0);
  return read_tensors(out);
}

}  // namespace tessera::test
