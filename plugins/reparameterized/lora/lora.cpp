// LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv:2106.09685); rsLoRA scaling
// (Kalajdzievski 2023, arXiv:2312.03732). The math and every key: README.md beside this.
//
//   y = W x + b + s · B A dropout(x)      A: (r, in), B: (out, r)
//   s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))
//
// Unmerged, the update is a parallel branch of the linear site; merging folds s·B·A
// into the base weight (an explicit step) and removes the branch.
#include <tessera/dropout.h>
#include <tessera/low_rank.h>
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <regex>

namespace {

using tessera::Tensor;

// HF PEFT's rank_pattern / alpha_pattern rule: the pattern matches the end of a module
// name at a dot boundary. We try it on both names of the site.
const double* pattern_value(const tessera::NumberTable& table, const tessera::LinearSite& site) {
  for (const auto& [pattern, value] : table) {
    std::regex re("(.*\\.)?(" + pattern + ")");
    if (std::regex_match(site.name(), re) || std::regex_match(site.hf_path(), re)) return &value;
  }
  return nullptr;
}

struct Adapter {
  tessera::LinearSite* site;
  Tensor A;  // (r, in)
  Tensor B;  // (out, r)
  double scaling;
  Tensor delta() const { return at::matmul(B, A) * scaling; }  // (out, in)
};

class Lora final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"r", ParamType::Int, std::int64_t{8}, "rank of the update B·A", 1, 65536, {}},
        {"lora_alpha", ParamType::Float, 8.0, "scale numerator: s = lora_alpha / r", 0, std::nullopt, {}},
        {"lora_dropout", ParamType::Float, 0.0, "dropout on the branch input x (training only)", 0, 0.999, {}},
        {"use_rslora", ParamType::Bool, false, "rank-stabilised scaling s = lora_alpha / sqrt(r)", std::nullopt, std::nullopt, {}},
        {"init_lora_weights", ParamType::String, std::string("true"),
         "\"true\": A Kaiming-uniform, B zero (update starts at 0); \"gaussian\": A ~ N(0, 1/r), B zero; "
         "\"false\": A and B both Kaiming-uniform (nonzero start, for tests)",
         std::nullopt, std::nullopt, {"true", "gaussian", "false"}},
        {"rank_pattern", ParamType::NumberTable, tessera::NumberTable{}, "per-target rank: {pattern = r}", std::nullopt, std::nullopt, {}},
        {"alpha_pattern", ParamType::NumberTable, tessera::NumberTable{}, "per-target alpha: {pattern = alpha}", std::nullopt, std::nullopt, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    for (const auto& [pattern, r] : p.get<tessera::NumberTable>("rank_pattern"))
      if (r < 1 || r != std::floor(r)) throw tessera::ParamError("rank_pattern", "rank_pattern['" + pattern + "'] must be a positive integer");
    for (const auto* key : {"rank_pattern", "alpha_pattern"})
      for (const auto& [pattern, _] : p.get<tessera::NumberTable>(key)) {
        try {
          std::regex re(pattern);
        } catch (const std::regex_error& e) {
          throw tessera::ParamError(key, std::string(key) + "['" + pattern + "'] is not a valid regex: " + e.what());
        }
      }
  }

  void attach(tessera::AttachContext& ctx) override {
    const auto& p = ctx.params;
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    params_ = p;
    dropout_ = p.number("lora_dropout");
    auto sites = ctx.model.match_linear(ctx.targets);
    if (sites.empty()) {
      std::string list;
      for (const auto& t : ctx.targets) list += (list.empty() ? "" : ", ") + t;
      throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets [" + list + "]");
    }
    const auto& opts = ctx.model.info().param_options;  // f32 master weights
    const std::string init = p.text("init_lora_weights");
    at::NoGradGuard no_grad;
    for (auto* site : sites) {
      const double* r_over = pattern_value(p.get<tessera::NumberTable>("rank_pattern"), *site);
      const double* a_over = pattern_value(p.get<tessera::NumberTable>("alpha_pattern"), *site);
      const std::int64_t r = r_over ? static_cast<std::int64_t>(*r_over) : p.integer("r");
      const double alpha = a_over ? *a_over : p.number("lora_alpha");
      const double scaling = p.flag("use_rslora") ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
      const auto in = site->in_features(), out = site->out_features();
      // nn.Linear's default init, kaiming_uniform(a=√5): U(-1/√fan_in, 1/√fan_in).
      Tensor A = at::empty({r, in}, opts);
      Tensor B = at::zeros({out, r}, opts);
      if (init == "gaussian") A.normal_(0.0, 1.0 / static_cast<double>(r));
      else A.uniform_(-1.0 / std::sqrt(static_cast<double>(in)), 1.0 / std::sqrt(static_cast<double>(in)));
      if (init == "false") B.uniform_(-1.0 / std::sqrt(static_cast<double>(r)), 1.0 / std::sqrt(static_cast<double>(r)));
      A.set_requires_grad(true);
      B.set_requires_grad(true);
      adapters_.push_back({site, A, B, scaling});
    }
    install();
  }

  bool mergeable() const override { return true; }

  void merge() override {
    if (merged_) return;
    for (auto& a : adapters_) {
      a.site->remove(*owner_);  // the fold replaces the branch; unmerge() installs it again
      a.site->weight().fold(a.delta().detach());
    }
    merged_ = true;
  }

  void unmerge() override {
    if (!merged_) return;
    for (auto& a : adapters_) a.site->weight().fold(-a.delta().detach());
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (const auto& a : adapters_) {
      out[a.site->name() + ".lora_A"] = a.A;
      out[a.site->name() + ".lora_B"] = a.B;
    }
    return out;
  }

  // HF PEFT's file keys: base_model.model.<module path>.lora_{A,B}.weight
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& a : adapters_) {
      out[key(a, "lora_A")] = a.A;
      out[key(a, "lora_B")] = a.B;
    }
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (tensors.size() != 2 * adapters_.size())
      throw std::runtime_error("adapter holds " + std::to_string(tensors.size()) + " tensors, this LoRA has " +
                               std::to_string(2 * adapters_.size()));
    at::NoGradGuard no_grad;
    for (auto& a : adapters_) {
      for (auto pair : std::initializer_list<std::pair<const char*, Tensor*>>{{"lora_A", &a.A}, {"lora_B", &a.B}}) {
        const std::string k = key(a, pair.first);
        auto it = tensors.find(k);
        if (it == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + k + "'");
        if (it->second.sizes() != pair.second->sizes())
          throw std::runtime_error("tensor '" + k + "' has shape " + c10::str(it->second.sizes()) + ", expected " +
                                   c10::str(pair.second->sizes()));
        pair.second->copy_(it->second);
      }
    }
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& a : adapters_) targets.push_back(a.site->hf_path());
    auto table = [&](const char* key) {
      nlohmann::json t = nlohmann::json::object();
      for (const auto& [k, v] : params_.get<tessera::NumberTable>(key)) t[k] = v;
      return t;
    };
    nlohmann::json rank = nlohmann::json::object();
    for (const auto& [k, v] : params_.get<tessera::NumberTable>("rank_pattern")) rank[k] = static_cast<std::int64_t>(v);
    const std::string init = params_.text("init_lora_weights");
    nlohmann::json j = {
        {"peft_type", "LORA"},
        {"r", params_.integer("r")},
        {"lora_alpha", params_.number("lora_alpha")},
        {"lora_dropout", params_.number("lora_dropout")},
        {"use_rslora", params_.flag("use_rslora")},
        {"init_lora_weights", init == "gaussian" ? nlohmann::json("gaussian") : nlohmann::json(init == "true")},
        {"target_modules", targets},
        {"rank_pattern", rank},
        {"alpha_pattern", table("alpha_pattern")},
        {"bias", "none"},
        {"fan_in_fan_out", false},
        {"modules_to_save", nullptr},
        {"task_type", nullptr},
        {"inference_mode", true},
    };
    return j.dump(2);
  }

 private:
  static std::string key(const Adapter& a, const char* which) {
    return "base_model.model." + a.site->hf_path() + "." + which + ".weight";
  }

  void install() {
    for (auto& a : adapters_) {
      const Adapter* ad = &a;  // adapters_ does not grow after attach
      a.site->add_branch(*owner_, [this, ad](const Tensor& x) {  // x: (..., in) -> (..., out)
        Tensor h = dropout_ > 0 ? tessera::dropout(x, dropout_, model_->training()) : x;
        // A bf16 model computes in bf16; the f32 masters get their gradients in f32.
        return tessera::low_rank(h, ad->A, ad->B, ad->scaling);
      });
    }
  }

  const tessera::Owner* owner_ = nullptr;  // the host's handle for this instance
  tessera::ModelView* model_ = nullptr;
  tessera::Params params_;
  std::vector<Adapter> adapters_;
  double dropout_ = 0.0;
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(Lora, "lora", "1.0.0", "reparameterized",
               "Low-rank update B·A of linear weights, scaled by alpha/r (rsLoRA: alpha/sqrt(r))",
               "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685")
