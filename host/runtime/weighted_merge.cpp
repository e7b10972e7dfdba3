#include "runtime/weighted_merge.h"

#include "formats/json_file.h"
#include "formats/safetensors.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <stdexcept>

namespace tessera {
namespace fs = std::filesystem;
namespace {

using Tensor = at::Tensor;

constexpr const char* kPrefix = "base_model.model.";

struct Lora {
  std::string dir;
  nlohmann::json config;
  std::int64_t r = 0;
  double scaling = 1.0;
  std::map<std::string, std::pair<Tensor, Tensor>> modules;  // HF module path -> (A (r, in), B (out, r))
  const std::map<std::string, Tensor>* deltas = nullptr;     // an adapter that is no plain LoRA: module -> ΔW (out, in)
  std::string kind() const { return deltas ? config.value("peft_type", std::string("?")) : "LORA"; }
};

bool ends_with(const std::string& s, const std::string& tail) { return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0; }

Lora read_lora(const std::string& dir, const WeightedMerge& how) {
  Lora l;
  l.dir = dir;
  const fs::path cfg = fs::path(dir) / "adapter_config.json";
  if (!fs::exists(cfg)) throw std::runtime_error(dir + ": no adapter_config.json (a PEFT adapter folder is expected)");
  l.config = read_json_file(cfg.string());
  if (const auto it = how.deltas.find(dir); it != how.deltas.end()) {  // its updates, computed by its plugin
    l.deltas = &it->second;
    return l;
  }
  if (!plain_lora_config(l.config))
    throw std::runtime_error(cfg.string() + ": a " + (l.config.value("use_dora", false) ? std::string("DoRA") : "'" + l.config.value("peft_type", "") + "'") +
                             " adapter's update is no pair of LoRA factors: its plugin computes it on the base model (give the model, --model)");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (l.config.contains(k) && l.config[k].is_object() && !l.config[k].empty())
      throw std::runtime_error(cfg.string() + ": " + k + " is not empty; adapters with per-module ranks or alphas are not combined here");
  if (!l.config.contains("r") || !l.config["r"].is_number_integer() || l.config["r"].get<std::int64_t>() < 1)
    throw std::runtime_error(cfg.string() + ": r must be a positive integer");
  l.r = l.config["r"].get<std::int64_t>();
  const double alpha = l.config.value("lora_alpha", 8.0);
  l.scaling = l.config.value("use_rslora", false) ? alpha / std::sqrt(static_cast<double>(l.r)) : alpha / static_cast<double>(l.r);
  const fs::path weights = fs::path(dir) / "adapter_model.safetensors";
  for (auto& [key, t] : read_safetensors(weights.string())) {
    const bool a = ends_with(key, ".lora_A.weight"), b = ends_with(key, ".lora_B.weight");
    if (key.rfind(kPrefix, 0) != 0 || !(a || b))
      throw std::runtime_error(weights.string() + ": tensor '" + key + "' is no LoRA factor (base_model.model.<module>.lora_A/B.weight)");
    const std::string module = key.substr(std::string(kPrefix).size(), key.size() - std::string(kPrefix).size() - std::string(".lora_A.weight").size());
    auto& slot = l.modules[module];
    // float32, off the file mapping: PEFT upcasts adapter weights on load, and the SVD and
    // quantile need it; the result is float32 as PEFT's new adapter is
    (a ? slot.first : slot.second) = t.to(at::kFloat).clone();
  }
  for (const auto& [m, ab] : l.modules) {
    const auto key = std::string(kPrefix) + m;
    if (!ab.first.defined() || !ab.second.defined()) throw std::runtime_error(weights.string() + ": module '" + m + "' lacks lora_" + (ab.first.defined() ? "B" : "A"));
    if (ab.first.dim() != 2 || ab.second.dim() != 2 || ab.first.size(0) != l.r || ab.second.size(1) != l.r)
      throw std::runtime_error(weights.string() + ": tensor '" + key + ".lora_A.weight' " + c10::str(ab.first.sizes()) + " or its lora_B " +
                               c10::str(ab.second.sizes()) + " is not of rank r = " + std::to_string(l.r));
  }
  if (l.modules.empty()) throw std::runtime_error(weights.string() + ": no LoRA tensors");
  return l;
}

// ---- PEFT's merge utilities (peft.utils.merge_utils), on stacked tensors ------------------

Tensor magnitude_prune_one(const Tensor& t, double density) {
  if (density >= 1) return t;
  Tensor mask = at::zeros_like(t).reshape({-1});
  const auto k = static_cast<std::int64_t>(density * static_cast<double>(t.numel()));
  const Tensor top = std::get<1>(at::topk(t.abs().reshape({-1}), k, 0, true));
  mask.index_fill_(0, top, 1);
  return t * mask.reshape(t.sizes());
}

Tensor random_prune_one(const Tensor& t, double density, at::Generator& gen) {
  if (density >= 1) return t;
  const Tensor mask = at::bernoulli(at::full_like(t, density), gen);
  return t * mask / density;
}

Tensor majority_mask(const Tensor& stacked, const std::string& method) {  // (n, ...) -> bool (n, ...)
  const Tensor sign = stacked.sign();
  const Tensor magnitude = method == "total" ? stacked.sum(0) : sign.sum(0);
  const Tensor majority = at::where(magnitude >= 0, 1, -1);
  return sign == majority;
}

Tensor disjoint_merge(const Tensor& weighted, const Tensor& mask) {
  return (weighted * mask).sum(0) / at::clamp((mask).sum(0), 1.0);
}

// `kind` without its "_svd": linear (PEFT's task_arithmetic for "svd"), ties, dare_linear,
// dare_ties, magnitude_prune. weights: float32 (n), as PEFT's torch.tensor(list) makes them.
Tensor combine(const std::vector<Tensor>& tensors, const Tensor& weights, const std::string& kind, double density, const std::string& sign_method,
               at::Generator& gen) {
  std::vector<Tensor> ts;
  for (const auto& t : tensors) {
    if (kind == "ties" || kind == "magnitude_prune") ts.push_back(magnitude_prune_one(t, density));
    else if (kind == "dare_linear" || kind == "dare_ties") ts.push_back(random_prune_one(t, density, gen));
    else ts.push_back(t);
  }
  const Tensor stacked = at::stack(ts, 0);
  std::vector<std::int64_t> shape(static_cast<std::size_t>(stacked.dim()), 1);
  shape[0] = weights.size(0);
  const Tensor weighted = stacked * weights.to(stacked.device()).view(shape);
  if (kind == "ties" || kind == "dare_ties") return disjoint_merge(weighted, majority_mask(stacked, sign_method));
  return weighted.sum(0);
}

Tensor weight_vector(const std::vector<double>& w) {
  std::vector<float> f(w.begin(), w.end());
  return at::tensor(f);
}

const std::set<std::string> kKinds = {"svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                                      "magnitude_prune", "magnitude_prune_svd"};

// What is asked, checked before any file is read: the kind as applied and its base form.
struct Plan {
  std::string kind, base_kind;  // base_kind: linear (also for "svd"), cat, ties, dare_linear, dare_ties, magnitude_prune
  bool svd = false;
  double density = 1.0;
};

// Adapters given as updates combine through the svd kinds only, at a rank asked for.
void check_updates(const Plan& p, const WeightedMerge& how, const std::vector<Lora>& loras) {
  for (const auto& l : loras) {
    if (!l.deltas) continue;
    if (!p.svd)
      throw std::runtime_error(l.dir + " is a " + l.kind() + " adapter: combination " + p.kind +
                               " combines LoRA factors; its update combines through svd, ties_svd, dare_linear_svd, dare_ties_svd or magnitude_prune_svd");
    if (!how.svd_rank) throw std::runtime_error(l.dir + " is a " + l.kind() + " adapter, whose update has no LoRA rank to default to: give the svd rank (--svd-rank)");
  }
}

Plan check_request(const WeightedMerge& how, std::size_t n_adapters) {
  if (how.adapters.empty()) throw std::runtime_error("no adapters to combine");
  if (how.weights.size() != how.adapters.size())
    throw std::runtime_error(std::to_string(how.weights.size()) + " weights for " + std::to_string(how.adapters.size()) + " adapters: give one weight per adapter");
  if (!kKinds.count(how.combination)) {
    std::string list;
    for (const auto& k : kKinds) list += (list.empty() ? "" : ", ") + k;
    throw std::runtime_error("combination '" + how.combination + "' is none of " + list);
  }
  Plan p;
  p.kind = n_adapters == 1 ? "linear" : how.combination;  // PEFT: one adapter is a linear scaling
  p.svd = ends_with(p.kind, "svd");
  p.base_kind = p.kind == "svd" ? "linear" : p.svd ? p.kind.substr(0, p.kind.size() - 4) : p.kind;
  if (p.base_kind != "linear" && p.base_kind != "cat" && !how.density)
    throw std::runtime_error("combination " + p.kind + " needs a density (the share of entries each adapter keeps)");
  p.density = how.density.value_or(1.0);
  if (p.density < 0) throw std::runtime_error("density " + std::to_string(p.density) + " is below 0");
  if (how.majority_sign != "total" && how.majority_sign != "frequency") throw std::runtime_error("majority sign method '" + how.majority_sign + "' is neither total nor frequency");
  const bool random = p.base_kind.rfind("dare", 0) == 0;
  if (random && p.density == 0) throw std::runtime_error("combination " + p.kind + " with density 0 keeps nothing and divides by 0: give a density in (0, 1]");
  if (random && how.module_order.empty())
    throw std::runtime_error("combination " + p.kind + " draws random masks in the order of the model's modules: give the model (--model)");
  if (how.svd_clamp && (*how.svd_clamp <= 0 || *how.svd_clamp > 1)) throw std::runtime_error("svd clamp " + std::to_string(*how.svd_clamp) + " is not a quantile in (0, 1]");
  return p;
}

// PEFT's new rank: the common rank (linear, ties, dare, magnitude_prune), their sum (cat), or
// svd_rank / the largest (svd kinds).
std::int64_t merged_rank(const Plan& p, const WeightedMerge& how, const std::vector<Lora>& loras) {
  std::int64_t rank = 0;
  if (p.kind == "cat") {
    for (const auto& l : loras) rank += l.r;
    return rank;
  }
  if (p.svd) {
    for (const auto& l : loras) rank = std::max(rank, l.r);
    if (how.svd_rank) rank = *how.svd_rank;
    if (rank < 1) throw std::runtime_error("svd rank " + std::to_string(rank) + " is not positive");
    return rank;
  }
  for (const auto& l : loras)  // (no updates given here: check_updates sent them to the svd kinds)
    if (l.r != loras[0].r)
      throw std::runtime_error("combination " + p.kind + " needs adapters of one rank: " + loras[0].dir + " has r = " + std::to_string(loras[0].r) + ", " + l.dir +
                               " r = " + std::to_string(l.r) + " (cat or an svd combination takes mixed ranks)");
  return loras[0].r;
}

// The modules, in the model's order where it is given (PEFT walks the model's modules).
std::vector<std::string> modules_in_order(const WeightedMerge& how, const std::vector<Lora>& loras) {
  std::set<std::string> all;
  for (const auto& l : loras) {
    for (const auto& [m, _] : l.modules) all.insert(m);
    if (l.deltas)
      for (const auto& [m, _] : *l.deltas) all.insert(m);
  }
  if (how.module_order.empty()) return {all.begin(), all.end()};
  std::vector<std::string> order;
  for (const auto& m : how.module_order)
    if (all.count(m)) order.push_back(m);
  for (const auto& m : all)
    if (std::find(order.begin(), order.end(), m) == order.end()) throw std::runtime_error("module '" + m + "' of the adapters is not a linear layer of the model");
  return order;
}

// One module's adapters (those that have it) and their weights.
struct Members {
  std::vector<const Lora*> loras;
  std::vector<double> weights;
  const Tensor& A(std::size_t i) const { return loras[i]->modules.at(module).first; }
  const Tensor& B(std::size_t i) const { return loras[i]->modules.at(module).second; }
  // ΔWᵢ = sᵢ Bᵢ Aᵢ, or the update given (out, in)
  Tensor delta(std::size_t i) const { return loras[i]->deltas ? loras[i]->deltas->at(module) : at::matmul(B(i), A(i)) * loras[i]->scaling; }
  std::pair<std::int64_t, std::int64_t> shape(std::size_t i) const {  // (out, in)
    if (loras[i]->deltas) return {loras[i]->deltas->at(module).size(0), loras[i]->deltas->at(module).size(1)};
    return {B(i).size(0), A(i).size(1)};
  }
  std::string module;
};

// cat: A = [w₁s₁A₁; …], B = [B₁ …], zero-padded to the merged rank (modules some adapters lack).
std::pair<Tensor, Tensor> concatenated(const Members& m, std::int64_t rank) {
  std::vector<Tensor> as, bs;
  for (std::size_t i = 0; i < m.loras.size(); ++i) as.push_back(m.A(i) * (m.weights[i] * m.loras[i]->scaling)), bs.push_back(m.B(i));
  const Tensor a = at::cat(as, 0), b = at::cat(bs, 1);
  Tensor A = at::zeros({rank, a.size(1)}, a.options()), B = at::zeros({b.size(0), rank}, b.options());
  A.narrow(0, 0, a.size(0)).copy_(a);
  B.narrow(1, 0, b.size(1)).copy_(b);
  return {A, B};
}

// The svd kinds: ΔWᵢ = sᵢ Bᵢ Aᵢ combined, then B = U S, A = Vᴴ at the merged rank, optionally clamped.
std::pair<Tensor, Tensor> through_svd(const Members& m, const Plan& p, const WeightedMerge& how, std::int64_t rank, at::Generator& gen) {
  const auto [out, in] = m.shape(0);
  if (rank > std::min(in, out)) throw std::runtime_error("svd rank " + std::to_string(rank) + " exceeds min(out, in) = " + std::to_string(std::min(in, out)) + " of module '" + m.module + "'");
  std::vector<Tensor> deltas;
  for (std::size_t i = 0; i < m.loras.size(); ++i) deltas.push_back(m.delta(i));  // (out, in)
  const Tensor delta = combine(deltas, weight_vector(m.weights), p.base_kind, p.density, how.majority_sign, gen);
  auto [U, S, Vh] = at::linalg_svd(delta, true);
  Tensor u = at::matmul(U.narrow(1, 0, rank), at::diag(S.narrow(0, 0, rank)));  // (out, r)
  Tensor vh = Vh.narrow(0, 0, rank);                                             // (r, in)
  if (how.svd_clamp) {
    const double hi = at::quantile(at::cat({u.flatten(), vh.flatten()}), *how.svd_clamp).item<double>();
    u = u.clamp(-hi, hi), vh = vh.clamp(-hi, hi);
  }
  return {vh.contiguous(), u.contiguous()};
}

// linear, ties, dare, magnitude_prune: the A's and the B's apart, weighted √|wᵢsᵢ|·sign and √|wᵢsᵢ|.
std::pair<Tensor, Tensor> factor_wise(const Members& m, const Plan& p, const WeightedMerge& how, at::Generator& gen) {
  std::vector<double> wa, wb;
  std::vector<Tensor> as, bs;
  for (std::size_t i = 0; i < m.loras.size(); ++i) {
    const double ws = m.weights[i] * m.loras[i]->scaling;
    wa.push_back(std::sqrt(std::abs(ws)) * (ws >= 0 ? 1 : -1));
    wb.push_back(std::sqrt(std::abs(ws)));
    as.push_back(m.A(i)), bs.push_back(m.B(i));
  }
  Tensor A = combine(as, weight_vector(wa), p.base_kind, p.density, how.majority_sign, gen);  // every A's draws, then every B's
  Tensor B = combine(bs, weight_vector(wb), p.base_kind, p.density, how.majority_sign, gen);
  return {A, B};
}

// The config the result starts from: the first plain LoRA's, else a LoRA config with the
// first adapter's model, revision and task.
nlohmann::json lora_config_base(const std::vector<Lora>& loras) {
  for (const auto& l : loras)
    if (!l.deltas) return l.config;
  nlohmann::json cfg = {{"peft_type", "LORA"}, {"bias", "none"}, {"lora_dropout", 0.0}, {"fan_in_fan_out", false}, {"modules_to_save", nullptr}};
  for (const char* k : {"base_model_name_or_path", "revision", "task_type"})
    if (loras[0].config.contains(k)) cfg[k] = loras[0].config[k];
  return cfg;
}

// The first LoRA's config (or lora_config_base's) with the new rank, scale 1 and every target.
std::string merged_config(const std::vector<Lora>& loras, std::int64_t rank) {
  nlohmann::json cfg = lora_config_base(loras);
  std::set<std::string> targets;
  for (const auto& l : loras) {
    const auto& t = l.config.value("target_modules", nlohmann::json());
    if (t.is_string()) throw std::runtime_error(l.dir + ": target_modules is a regex; list the modules to combine adapters");
    if (t.is_array())
      for (const auto& x : t) targets.insert(x.get<std::string>());
  }
  cfg["r"] = rank;
  cfg["lora_alpha"] = rank;
  cfg["use_rslora"] = false;  // scale 1 (PEFT keeps the first adapter's flag, which would make it √r)
  cfg["init_lora_weights"] = true;
  cfg["use_dora"] = false;
  cfg["target_modules"] = std::vector<std::string>(targets.begin(), targets.end());
  cfg["rank_pattern"] = nlohmann::json::object();
  cfg["alpha_pattern"] = nlohmann::json::object();
  cfg["inference_mode"] = true;
  return cfg.dump(2);
}

}  // namespace

bool plain_lora_config(const nlohmann::json& config) {
  std::string type = config.value("peft_type", "");
  std::transform(type.begin(), type.end(), type.begin(), ::toupper);
  return type == "LORA" && !config.value("use_dora", false);
}

MergedAdapter weighted_merge(const WeightedMerge& how) {
  at::NoGradGuard no_grad;
  const Plan plan = check_request(how, how.adapters.size());
  std::vector<Lora> loras;
  for (const auto& d : how.adapters) loras.push_back(read_lora(d, how));
  check_updates(plan, how, loras);
  MergedAdapter out;
  out.rank = merged_rank(plan, how, loras);
  out.combination = plan.kind;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(how.seed);
  for (const auto& module : modules_in_order(how, loras)) {
    Members m;
    m.module = module;
    for (std::size_t i = 0; i < loras.size(); ++i)
      if (loras[i].modules.count(module) || (loras[i].deltas && loras[i].deltas->count(module))) m.loras.push_back(&loras[i]), m.weights.push_back(how.weights[i]);
    for (std::size_t i = 1; i < m.loras.size(); ++i)
      if (m.shape(i) != m.shape(0))
        throw std::runtime_error("module '" + module + "' is " + std::to_string(m.shape(0).first) + " × " + std::to_string(m.shape(0).second) + " in " + m.loras[0]->dir +
                                 " but not in " + m.loras[i]->dir);
    const auto [A, B] = plan.kind == "cat" ? concatenated(m, out.rank) : plan.svd ? through_svd(m, plan, how, out.rank, gen) : factor_wise(m, plan, how, gen);
    out.tensors[std::string(kPrefix) + module + ".lora_A.weight"] = A;
    out.tensors[std::string(kPrefix) + module + ".lora_B.weight"] = B;
  }
  out.config_json = merged_config(loras, out.rank);
  return out;
}

}  // namespace tessera
