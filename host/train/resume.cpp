#include "train/resume.h"

#include "formats/safetensors.h"
#include "runtime/config.h"
#include "train/run_dir.h"

#include <tessera/extensions.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace tessera {
namespace fs = std::filesystem;

namespace {

constexpr std::size_t kKept = 2;

fs::path checkpoints_dir(const std::string& run_dir) { return fs::path(run_dir) / "checkpoints"; }

// The complete checkpoint folders (step-<N>, no suffix), newest first.
std::vector<fs::path> complete(const std::string& run_dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(checkpoints_dir(run_dir))) return out;
  for (const auto& e : fs::directory_iterator(checkpoints_dir(run_dir))) {
    const auto name = e.path().filename().string();
    if (e.is_directory() && name.rfind("step-", 0) == 0 && name.find('.') == std::string::npos) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end(), [](const fs::path& a, const fs::path& b) { return a.filename().string() > b.filename().string(); });
  return out;
}

// The generator of the device the run computes on (tessera::dropout and plugins draw there).
at::Generator device_generator(Session& s) {
  const auto device = s.model().info().options.device();
  return device.is_cpu() ? at::detail::getDefaultCPUGenerator() : at::globalContext().defaultGenerator(device);
}

const tessera_method_resume_v1* resume_extension(MethodInstance& m) {
  return m.extension<tessera_method_resume_v1>(TESSERA_EXT_METHOD_RESUME, 1);
}

// The tensors under "<prefix>", the prefix dropped.
NamedTensors under(const NamedTensors& all, const std::string& prefix) {
  NamedTensors out;
  for (auto it = all.lower_bound(prefix); it != all.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it)
    out[it->first.substr(prefix.size())] = it->second;
  return out;
}

// `into` takes the checkpoint's values of `key` in place (the optimizer and the sites hold it).
void take(const NamedTensors& all, const std::string& key, const Tensor& into, const std::string& dir) {
  const auto it = all.find(key);
  if (it == all.end()) throw std::runtime_error("checkpoint " + dir + " has no tensor '" + key + "' that this run trains");
  if (it->second.sizes() != into.sizes())
    throw std::runtime_error("checkpoint " + dir + ": tensor '" + key + "' has shape " + c10::str(it->second.sizes()) + ", this run's " + c10::str(into.sizes()));
  at::NoGradGuard no_grad;
  into.detach().copy_(it->second);
}

NamedTensors collect(Session& s, const OptimizerView& opt) {
  NamedTensors t;
  auto& m = s.methods();
  for (std::size_t i = 0; i < m.size(); ++i) {
    const std::string name = m.config(i).name;
    for (auto& [k, v] : m[i].call("state", [](Method& x) { return x.state(); })) t["state/" + name + "/" + k] = v.detach();
    for (auto& [k, v] : m[i].call("trainable", [](Method& x) { return x.trainable(); })) t["trainable/" + name + "/" + k] = v.detach();
    if (const auto* ext = resume_extension(m[i])) {
      NamedTensors extra;
      m[i].call("resume save", [&](Method&) { ext->save(ext->method, &extra); });
      for (auto& [k, v] : extra) t["resume/" + name + "/" + k] = v.detach();
    }
  }
  for (auto& [k, v] : m.group_state()) t["groups/" + k] = v.detach();
  for (auto& [k, v] : s.task().head()) t["head/" + k] = v.detach();
  for (std::size_t g = 0; g < opt.names.size(); ++g) {
    const auto& state = opt.adamw.state(g);
    for (std::size_t j = 0; j < state.size(); ++j) {
      const std::string p = "adamw/" + std::to_string(g) + "/" + opt.names[g].at(j) + "/";
      t[p + "exp_avg"] = state[j].exp_avg, t[p + "exp_avg_sq"] = state[j].exp_avg_sq, t[p + "step"] = state[j].step;
    }
  }
  t["rng/cpu"] = at::detail::getDefaultCPUGenerator().get_state();
  if (!s.model().info().options.device().is_cpu()) t["rng/device"] = device_generator(s).get_state();
  return t;
}

// The checkpoint's own streams (its first rank's) in rank_generators()' form.
Tensor rank_generators_of(const std::map<std::string, Tensor>& t) {
  return t.count("rng/device") ? at::cat({t.at("rng/cpu"), t.at("rng/device")}) : t.at("rng/cpu");
}

}  // namespace

at::Tensor rank_generators(Session& s) {
  std::vector<Tensor> parts{at::detail::getDefaultCPUGenerator().get_state()};
  if (!s.model().info().options.device().is_cpu()) parts.push_back(device_generator(s).get_state());
  return at::cat(parts);
}

void set_rank_generators(Session& s, const at::Tensor& bytes) {
  at::Generator cpu = at::detail::getDefaultCPUGenerator();
  const auto n = cpu.get_state().numel();
  cpu.set_state(bytes.narrow(0, 0, n).clone());
  if (!s.model().info().options.device().is_cpu()) device_generator(s).set_state(bytes.narrow(0, n, bytes.numel() - n).clone());
}

void save_checkpoint(Session& s, const OptimizerView& opt, const TrainPosition& at, const std::string& run_dir, const std::vector<at::Tensor>& ranks) {
  auto tensors = collect(s, opt);
  for (std::size_t r = 1; r < ranks.size(); ++r) tensors["rng/rank" + std::to_string(r)] = ranks[r];
  const nlohmann::json position = {{"step", at.step},
                                   {"epoch", at.epoch},
                                   {"epoch_step", at.epoch_step},
                                   {"epochs_saved", at.epochs_saved},
                                   {"metrics_bytes", at.metrics_bytes},
                                   {"config", resolved_toml(s.config())}};
  char name[32];
  std::snprintf(name, sizeof name, "step-%09lld", static_cast<long long>(at.step));
  fs::create_directories(checkpoints_dir(run_dir));
  replace_folder((checkpoints_dir(run_dir) / name).string(), [&](const std::string& dir) {
    save_safetensors((fs::path(dir) / "tensors.safetensors").string(), tensors);
    write_file_atomic((fs::path(dir) / "position.json").string(), position.dump(2) + "\n");
  });
  const auto all = complete(run_dir);
  for (std::size_t i = kKept; i < all.size(); ++i) fs::remove_all(all[i]);
  for (const auto& e : fs::directory_iterator(checkpoints_dir(run_dir)))  // what a killed save left half-written
    if (const auto n = e.path().filename().string(); n.rfind("step-", 0) == 0 && n.find('.') != std::string::npos) fs::remove_all(e.path());
}

std::optional<Checkpoint> newest_checkpoint(const std::string& run_dir) {
  for (const auto& dir : complete(run_dir)) {
    try {
      std::ifstream in(dir / "position.json");
      if (!in) throw std::runtime_error("no position.json");
      const auto j = nlohmann::json::parse(in);
      Checkpoint c{dir.string(),
                   {j.at("step").get<std::int64_t>(), j.at("epoch").get<std::int64_t>(), j.at("epoch_step").get<std::int64_t>(),
                    j.at("epochs_saved").get<std::int64_t>(), j.at("metrics_bytes").get<std::uint64_t>()},
                   j.at("config").get<std::string>()};
      read_safetensors((dir / "tensors.safetensors").string());  // every tensor inside the file, or it throws
      return c;
    } catch (const std::exception& e) {
      spdlog::warn("checkpoint {} does not read back whole ({}): skipped for the one before", dir.string(), e.what());
    }
  }
  return std::nullopt;
}

std::vector<Tensor> restore_checkpoint(Session& s, const std::function<OptimizerView()>& optimizer, const Checkpoint& c, std::int64_t rank, std::int64_t world,
                                       std::int64_t passes) {
  const auto t = read_safetensors((fs::path(c.dir) / "tensors.safetensors").string());
  auto& m = s.methods();
  for (std::size_t i = 0; i < m.size(); ++i) {
    const std::string name = m.config(i).name;
    // With the extension the method's own load() restores what state() would (its shapes too).
    if (const auto* ext = resume_extension(m[i])) {
      const NamedTensors extra = under(t, "resume/" + name + "/");
      m[i].call("resume load", [&](Method&) { ext->load(ext->method, &extra); });
    } else {
      const NamedTensors state = under(t, "state/" + name + "/");
      m[i].call("load_state", [&](Method& x) { x.load_state(state); });
    }
    for (auto& [k, v] : m[i].call("trainable", [](Method& x) { return x.trainable(); })) take(t, "trainable/" + name + "/" + k, v, c.dir);
  }
  for (auto& [k, v] : m.group_state()) take(t, "groups/" + k, v, c.dir);
  for (auto& [k, v] : s.task().head()) take(t, "head/" + k, v, c.dir);
  const OptimizerView opt = optimizer();
  for (std::size_t g = 0; g < opt.names.size(); ++g) {
    const auto& params = opt.adamw.groups().at(g).params;
    std::vector<FusedAdamW::State> state;
    for (std::size_t j = 0; j < opt.names[g].size(); ++j) {
      const std::string p = "adamw/" + std::to_string(g) + "/" + opt.names[g][j] + "/";
      if (!t.count(p + "step")) break;  // the group had not stepped yet
      FusedAdamW::State st{at::zeros_like(params[j]), at::zeros_like(params[j]), at::zeros({}, params[j].options().dtype(at::kFloat))};
      take(t, p + "exp_avg", st.exp_avg, c.dir), take(t, p + "exp_avg_sq", st.exp_avg_sq, c.dir), take(t, p + "step", st.step, c.dir);
      state.push_back(std::move(st));
    }
    if (!state.empty() && state.size() != opt.names[g].size())
      throw std::runtime_error("checkpoint " + c.dir + " has no optimizer moments for '" + opt.names[g][state.size()] + "'");
    opt.adamw.set_state(g, std::move(state));
  }
  // Last: nothing may draw from the generators between here and the next step.
  const std::int64_t streams = world * passes;
  const bool as_many = streams > 1 && t.count("rng/rank" + std::to_string(streams - 1)) && !t.count("rng/rank" + std::to_string(streams));
  const Tensor first = rank_generators_of(t);
  auto stream = [&](std::int64_t v) { return as_many && v > 0 ? t.at("rng/rank" + std::to_string(v)).clone() : first.clone(); };
  set_rank_generators(s, stream(rank * passes));
  std::vector<Tensor> kept;
  for (std::int64_t k = 1; k < passes; ++k) kept.push_back(stream(rank * passes + k));
  return kept;
}

}  // namespace tessera
