// Diff pruning (Guo, Rush & Kim 2021, "Parameter-Efficient Transfer Learning with Diff
// Pruning", arXiv:2012.07463). The math and every key: README.md beside this.
//
// Stage 1, from the first step (per targeted tensor θ, its entries i, group g = the tensor):
//   u ~ U(0,1)                        drawn afresh each training step
//   s = σ(log u − log(1 − u) + α)     hard-concrete, stretched to (l, r) and clamped:
//   z = min(1, max(0, s (r − l) + l)) in evaluation s = σ(α)
//   δ = z ⊙ z_g ⊙ w                   z_g: the tensor's one gate (structured; else 1)
//   loss += λ Σ_i σ(α_i − log(−l/r)) · σ(α_g − log(−l/r))    the expected L0 norm of δ
// Stage 2, at step ⌊prune_at · steps⌋: magnitude projection — the k = ⌈target_ratio · total⌉
// entries of largest |δ| (evaluation gates) over every target keep their value, the rest are
// 0 — then a fixed-mask fine-tune of those k values alone, as an SDK 2.4 sparse delta.
#include "../fisher.h"
#include "../sparse_deltas.h"

#include <tessera/extensions.h>
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

using tessera::Tensor;

const std::vector<std::string> kLayers = {"re:(encoder\\.|decoder\\.)?layers\\..*"};

struct Dense {
  tessera::ParameterSite* site;
  Tensor w, alpha, group_alpha;  // base's shape, base's shape, (1) — f32 masters
  at::Generator gen;             // this tensor's noise, on the model's device
  Tensor logit_u;                // log u − log(1 − u) of this step, base's shape, and (1) for the group
  Tensor logit_ug;
  std::int64_t drawn_at = -1;    // the noise_step_ it was drawn at
  Tensor folded;                 // while merged
};

class DiffPruning final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"target_ratio", ParamType::Float, 0.005, "the share of targeted entries δ keeps at the projection (the paper's 0.5%)", 1e-9, 1.0, {}},
        {"prune_at", ParamType::Float, 0.5, "the share of the run's optimizer steps after which δ is projected and its mask fixed, in (0, 1)", 0.0, 1.0, {}},
        {"l0_lambda", ParamType::Float, 1.25e-7, "λ: the weight of the expected L0 norm in the loss (the paper's 1.25e-7)", 0.0, 1e30, {}},
        {"alpha_init", ParamType::Float, 5.0, "the gates' log-odds α at the start (the paper's 5: every gate near 1)", -1e3, 1e3, {}},
        {"structured", ParamType::Bool, true, "one more gate per tensor, z_g, whose log-odds train too (the paper's structured diff pruning)", {}, {}, {}},
        {"l", ParamType::Float, -1.5, "the hard-concrete stretch's lower end", -1e3, 0.0, {}},
        {"r", ParamType::Float, 1.5, "the hard-concrete stretch's upper end", 1.0, 1e3, {}},
        {"seed", ParamType::Int, std::int64_t{-1}, "the gates' noise seed (-1: drawn from the run's seed)", -1.0, 9.0e15, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    if (!(p.number("target_ratio") > 0.0)) throw tessera::ParamError("target_ratio", "target_ratio must be in (0, 1]");
    if (!(p.number("prune_at") > 0.0 && p.number("prune_at") < 1.0))
      throw tessera::ParamError("prune_at", "prune_at must be in (0, 1): the projection comes after some steps of the first stage and before the run ends");
    if (!(p.number("l") < 0.0)) throw tessera::ParamError("l", "l must be below 0: the stretched gate must reach exactly 0");
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    instance_ = ctx.instance;
    training_ = tessera::host_extension<tessera_host_training_v1>(ctx.model, TESSERA_EXT_HOST_TRAINING, 1);
    target_ = ctx.params.number("target_ratio");
    prune_at_ = ctx.params.number("prune_at");
    lambda_ = ctx.params.number("l0_lambda");
    structured_ = ctx.params.flag("structured");
    l_ = ctx.params.number("l"), r_ = ctx.params.number("r");
    opts_ = ctx.model.info().param_options;
    sites_ = ctx.model.match_parameters(ctx.targets.empty() ? kLayers : ctx.targets);
    if (sites_.empty()) throw std::runtime_error("no parameter of this " + ctx.model.info().architecture + " model matches the targets");
    auto seed = ctx.params.integer("seed");
    if (seed < 0) seed = at::randint(0, std::numeric_limits<std::int32_t>::max(), {1}, at::kLong).item<std::int64_t>();
    seed_ = seed;
    // Tensor j in the order of HF names draws its noise from a generator seeded seed + j:
    // a plain PyTorch loop over sorted names draws the same.
    std::vector<std::size_t> order(sites_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return sites_[a]->hf_name() < sites_[b]->hf_name(); });
    dense_.resize(sites_.size());
    const double a0 = ctx.params.number("alpha_init");
    for (std::size_t j = 0; j < order.size(); ++j) {
      auto* s = sites_[order[j]];
      auto& d = dense_[order[j]];
      d.site = s;
      d.w = at::zeros(s->base().sizes(), opts_).set_requires_grad(true);
      d.alpha = at::full(s->base().sizes(), a0, opts_).set_requires_grad(true);
      if (structured_) d.group_alpha = at::full({1}, a0, opts_).set_requires_grad(true);
      d.gen = at::globalContext().defaultGenerator(opts_.device()).clone();  // private, of the device's kind
      d.gen.set_current_seed(static_cast<std::uint64_t>(seed) + j);
    }
    install_dense();
  }

  // A new step: each tensor's noise is drawn afresh when its delta is next computed in training.
  void on_step(const tessera::StepInfo& info) override {
    ++noise_step_;
    if (!projected_ && info.step >= static_cast<std::int64_t>(std::floor(prune_at_ * static_cast<double>(info.total)))) project();
  }

  // λ · E[‖δ‖₀]: each entry's probability of a non-zero gate, times its tensor's (structured).
  Tensor extra_loss() override {
    if (projected_ || lambda_ == 0.0) return {};
    const double shift = std::log(-l_ / r_);
    Tensor total;
    for (auto& d : dense_) {
      Tensor p = at::sigmoid(d.alpha - shift).sum();
      if (structured_) p = p * at::sigmoid(d.group_alpha - shift).sum();
      total = total.defined() ? total + p : p;
    }
    return total * lambda_;
  }

  // An exact resume (tessera.method.resume): the stage, past the projection its sparse state,
  // before it each tensor's noise generator and the step counter.
  const void* extension(const char* id) const override { return std::string(id) == TESSERA_EXT_METHOD_RESUME ? &resume_ : nullptr; }

  bool mergeable() const override { return true; }
  void merge() override {
    if (projected_) return sparse_.merge(*owner_);
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& d : dense_) {
      d.site->remove(*owner_);
      d.folded = eval_delta(d).to(d.site->base().scalar_type());
      d.site->fold(d.folded);
    }
    merged_ = true;
  }
  void unmerge() override {
    if (projected_) return sparse_.unmerge(*owner_);
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& d : dense_) d.site->fold(-d.folded), d.folded = Tensor();
    merged_ = false;
    install_dense();
  }

  tessera::NamedTensors trainable() override {
    if (projected_) return sparse_.trainable();
    tessera::NamedTensors out;
    for (const auto& d : dense_) {
      out[d.site->name() + ".diff_w"] = d.w;
      out[d.site->name() + ".diff_alpha"] = d.alpha;
      if (structured_) out[d.site->name() + ".diff_group_alpha"] = d.group_alpha;
    }
    return out;
  }

  // Before the projection: `<HF name>.diff_w`, `.diff_alpha` (and `.diff_group_alpha`), what
  // training continues from; after it: `<HF name>.diff_indices` (k) and `.diff_delta` (k).
  tessera::NamedTensors state() override {
    if (projected_) return sparse_.state();
    tessera::NamedTensors out;
    for (const auto& d : dense_) {
      out[d.site->hf_name() + ".diff_w"] = d.w;
      out[d.site->hf_name() + ".diff_alpha"] = d.alpha;
      if (structured_) out[d.site->hf_name() + ".diff_group_alpha"] = d.group_alpha;
    }
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_ || sparse_.merged()) throw std::runtime_error("load_state() while merged: unmerge first");
    bool sparse = false;
    for (const auto& [k, _] : tensors) sparse |= k.size() > 11 && k.compare(k.size() - 11, 11, ".diff_delta") == 0;
    if (sparse) {
      sparse_.load(*owner_, tensors, sites_, opts_, "projected diff-pruning");
      if (!projected_) {
        for (auto& d : dense_) d.site->remove(*owner_);
        sparse_.reset(*owner_, std::vector<tessera::SparseDeltas::Kept>(sparse_.kept()));
        dense_.clear();
        projected_ = true;
        if (training_ != nullptr) training_->trainable_changed(training_->host, instance_.c_str());
      }
      return;
    }
    if (projected_) throw std::runtime_error("this diff-pruning instance is past its projection: it loads a projected adapter (.diff_indices and .diff_delta)");
    std::vector<std::string> expected;
    for (const auto& d : dense_) {
      expected.push_back(d.site->hf_name() + ".diff_w");
      expected.push_back(d.site->hf_name() + ".diff_alpha");
      if (structured_) expected.push_back(d.site->hf_name() + ".diff_group_alpha");
    }
    for (const auto& [k, _] : tensors)
      if (std::find(expected.begin(), expected.end(), k) == expected.end())
        throw std::runtime_error("tensor '" + k + "' is not part of this diff-pruning adapter (other targets, another model, or structured = " + (structured_ ? "false" : "true") + ")");
    auto check = [&](const std::string& k, const Tensor& like) {
      const auto it = tensors.find(k);
      if (it == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + k + "'");
      if (it->second.sizes() != like.sizes()) throw std::runtime_error("tensor '" + k + "' has shape " + c10::str(it->second.sizes()) + ", expected " + c10::str(like.sizes()));
    };
    for (const auto& d : dense_) {
      check(d.site->hf_name() + ".diff_w", d.w), check(d.site->hf_name() + ".diff_alpha", d.alpha);
      if (structured_) check(d.site->hf_name() + ".diff_group_alpha", d.group_alpha);
    }
    at::NoGradGuard no_grad;
    for (auto& d : dense_) {
      d.w.copy_(tensors.at(d.site->hf_name() + ".diff_w"));
      d.alpha.copy_(tensors.at(d.site->hf_name() + ".diff_alpha"));
      if (structured_) d.group_alpha.copy_(tensors.at(d.site->hf_name() + ".diff_group_alpha"));
    }
  }

  std::string adapter_config_json() const override {
    nlohmann::json t = {{"target_ratio", target_}, {"prune_at", prune_at_}, {"l0_lambda", lambda_}, {"structured", structured_},
                        {"l", l_},          {"r", r_},             {"seed", seed_},        {"projected", projected_}};
    if (projected_) t["kept"] = sparse_.count();
    return nlohmann::json{{"peft_type", "DIFF_PRUNING"}, {"tessera", t}}.dump(2);
  }

 private:
  Tensor gate(const Tensor& alpha, const Tensor& logit_u) const {
    const Tensor s = logit_u.defined() ? at::sigmoid(logit_u + alpha) : at::sigmoid(alpha);
    return (s * (r_ - l_) + l_).clamp(0.0, 1.0);
  }
  Tensor eval_delta(const Dense& d) const {
    Tensor z = gate(d.alpha, {});
    if (structured_) z = z * gate(d.group_alpha, {});
    return z * d.w;
  }
  static Tensor logit_uniform(at::Generator& gen, at::IntArrayRef shape, const c10::TensorOptions& o) {
    // u in (0, 1): torch.rand's [0, 1) without its 0, whose logit is −∞
    const Tensor u = at::rand(shape, gen, o).clamp_min(std::numeric_limits<float>::min());
    return at::log(u) - at::log1p(-u);
  }

  void install_dense() {
    for (std::size_t i = 0; i < dense_.size(); ++i) {
      const auto dtype = dense_[i].site->base().scalar_type();
      dense_[i].site->add_delta(*owner_, [this, i, dtype] {
        auto& d = dense_[i];
        if (!model_->training()) return eval_delta(d).to(dtype);
        if (d.drawn_at != noise_step_) {  // once per step, however often the tensor is read
          d.logit_u = logit_uniform(d.gen, d.w.sizes(), opts_);
          if (structured_) d.logit_ug = logit_uniform(d.gen, {1}, opts_);
          d.drawn_at = noise_step_;
        }
        Tensor z = gate(d.alpha, d.logit_u);
        if (structured_) z = z * gate(d.group_alpha, d.logit_ug);
        return (z * d.w).to(dtype);
      });
    }
  }

  static void save_resume(void* self, tessera::NamedTensors* out) {
    auto* m = static_cast<DiffPruning*>(self);
    (*out)["noise_step"] = at::full({1}, m->noise_step_, at::kLong);
    if (m->projected_) {
      for (auto& [k, v] : m->state()) (*out)["state." + k] = v;
      return;
    }
    for (std::size_t j = 0; j < m->dense_.size(); ++j) (*out)["generator." + std::to_string(j)] = m->dense_[j].gen.get_state();
  }
  static void load_resume(void* self, const tessera::NamedTensors* in) {
    auto* m = static_cast<DiffPruning*>(self);
    tessera::NamedTensors state;
    for (const auto& [k, v] : *in)
      if (k.rfind("state.", 0) == 0) state[k.substr(6)] = v;
    if (!state.empty()) m->load_state(state);  // the projected stage: trainable() becomes the kept entries
    for (std::size_t j = 0; j < m->dense_.size(); ++j) m->dense_[j].gen.set_state(in->at("generator." + std::to_string(j)).clone());
    m->noise_step_ = in->at("noise_step").item<std::int64_t>();
  }

  // Magnitude projection onto the k largest |δ| (evaluation gates), then the fixed-mask stage.
  void project() {
    if (merged_) throw std::runtime_error("diff pruning's projection while merged: unmerge first");
    at::NoGradGuard no_grad;
    std::vector<Tensor> magnitude, values;
    for (auto& d : dense_) values.push_back(eval_delta(d)), magnitude.push_back(values.back().abs());
    tessera::ScoreSelection select(magnitude, false);
    if (select.kth_largest(1) == 0.0f)
      tessera::log(*model_, TESSERA_LOG_WARN, instance_, "every entry of δ is 0 at the projection (no step moved w yet): the kept entries are the first ones in tensor order");
    const auto k = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(target_ * static_cast<double>(select.total()) - 1e-9)));
    const auto idx = select.top_k(k);
    std::vector<tessera::SparseDeltas::Kept> fresh;
    for (std::size_t i = 0; i < dense_.size(); ++i) {
      dense_[i].site->remove(*owner_);
      if (idx[i].numel() > 0)
        fresh.push_back({dense_[i].site, idx[i], values[i].reshape({-1}).index_select(0, idx[i]).clone().set_requires_grad(true), {}});
    }
    dense_.clear();  // w, α and their moments go: what trains now is k numbers
    sparse_.reset(*owner_, std::move(fresh));
    projected_ = true;
    if (training_ != nullptr) training_->trainable_changed(training_->host, instance_.c_str());
    tessera::log(*model_, TESSERA_LOG_INFO, instance_, "projected δ onto its " + std::to_string(k) + " largest entries; the fixed-mask stage begins");
  }

  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  const tessera_host_training_v1* training_ = nullptr;
  std::string instance_;
  double target_ = 0.005, prune_at_ = 0.5, lambda_ = 1.25e-7, l_ = -1.5, r_ = 1.5;
  bool structured_ = true, projected_ = false, merged_ = false;
  tessera_method_resume_v1 resume_{{sizeof(tessera_method_resume_v1), 1}, this, &save_resume, &load_resume};
  std::int64_t seed_ = 0, noise_step_ = 0;
  c10::TensorOptions opts_;
  std::vector<tessera::ParameterSite*> sites_;
  std::vector<Dense> dense_;
  tessera::SparseDeltas sparse_{".diff"};
};

}  // namespace

TESSERA_PLUGIN(DiffPruning, "diff_pruning", "1.0.0", "partial",
               "A sparse task-specific difference to the base, learned with a hard-concrete L0 relaxation, projected to a target sparsity and fine-tuned on a fixed mask",
               "Guo, Rush & Kim 2021, Parameter-Efficient Transfer Learning with Diff Pruning, arXiv:2012.07463")
