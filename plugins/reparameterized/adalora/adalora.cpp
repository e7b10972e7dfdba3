// AdaLoRA: adaptive budget allocation (Zhang et al. 2023, "Adaptive Budget Allocation for
// Parameter-Efficient Fine-Tuning", ICLR 2023, arXiv:2303.10512), as PEFT's AdaLoraConfig
// runs it. The math and every key: README.md beside this.
//
//   y = W x + b + s · P (Λ ⊙ Q) x       P: (out, r), Λ: (r, 1), Q: (r, in); s = alpha / (r₀ + 1e-5)
//
// An SVD-shaped update whose singular values Λ are switched off triplet by triplet: after each
// optimizer step (tessera.method.after_step, while the step's gradients are held) every
// entry's importance |θ · ∂L/∂θ| is smoothed (β1) and its uncertainty tracked (β2); a
// triplet (Pᵢ, λᵢ, Qᵢ) scores its λ's score plus the mean scores of its column of P and row of
// Q, and every deltaT steps the lowest-scoring triplets of all sites together have λ set to
// 0 until the budget of the cubic schedule is met: r₀ per site at first, target_r per site
// after the last tfinal steps, whose rank pattern is then fixed. The regulariser
// w · mean ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F keeps P and Q near orthogonal so λ stays a singular value.
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <tessera/dropout.h>
#include <tessera/extensions.h>
#include <tessera/low_rank.h>

#include <cmath>

namespace {

using tessera::Tensor;

// PEFT's three tensors per site, and the allocator's two moving averages of each.
struct Triplets {
  tessera::LinearSite* site;
  Tensor A, E, B;  // Q (r, in), Λ (r, 1), P (out, r)
  Tensor avg[3], unc[3];  // sensitivity EMA and uncertainty EMA of A, E, B; undefined until the first update
  Tensor keep;            // (r) bool: the triplets the last allocation kept; undefined before any
  Tensor kept;            // keep's indices (made once per allocation: no device sync per forward)
  Tensor loaded_pattern;  // (r₀) bool: a subset loaded from a file, as its config pattern reads
  Tensor folded;          // while merged
  Tensor* part(int i) { return i == 0 ? &A : i == 1 ? &E : &B; }
};

class AdaLoRA final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"init_r", ParamType::Int, std::int64_t{12}, "rank r₀ of every site's update at the start", 1, 65536, {}},
        {"target_r", ParamType::Int, std::int64_t{8}, "average rank per site the budget ends at (≤ init_r)", 0, 65536, {}},
        {"lora_alpha", ParamType::Float, 8.0, "scale numerator: s = lora_alpha / (init_r + 1e-5); 0 means s = init_r / (init_r + 1e-5)", 0, std::nullopt, {}},
        {"lora_dropout", ParamType::Float, 0.0, "dropout on the update's input x (training only)", 0, 0.999, {}},
        {"tinit", ParamType::Int, std::int64_t{0}, "steps of warm-up at the full budget before any triplet is masked", 0, std::nullopt, {}},
        {"tfinal", ParamType::Int, std::int64_t{0}, "last steps that train with the final rank pattern fixed", 0, std::nullopt, {}},
        {"deltaT", ParamType::Int, std::int64_t{1}, "steps between two allocations while the budget shrinks", 1, std::nullopt, {}},
        {"beta1", ParamType::Float, 0.85, "EMA factor of the sensitivity |θ·∂L/∂θ|, in (0, 1)", 0, 1, {}},
        {"beta2", ParamType::Float, 0.85, "EMA factor of its uncertainty, in (0, 1)", 0, 1, {}},
        {"orth_reg_weight", ParamType::Float, 0.5, "weight w of the orthogonality regulariser", 0, std::nullopt, {}},
        {"total_step", ParamType::Int, std::int64_t{0}, "steps of the run the schedule spans; 0: the run's own step count", 0, std::nullopt, {}},
        {"init_lora_weights", ParamType::Bool, true, "true: Λ = 0, P and Q normal(0, 0.02) (PEFT's); false: all three standard normal (tests)", {}, {}, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    if (p.integer("target_r") > p.integer("init_r"))
      throw tessera::ParamError("target_r", "target_r " + std::to_string(p.integer("target_r")) + " is above init_r " + std::to_string(p.integer("init_r")) +
                                                 ": the budget can only shrink");
    for (const char* k : {"beta1", "beta2"})
      if (p.number(k) <= 0 || p.number(k) >= 1) throw tessera::ParamError(k, std::string(k) + " must lie strictly between 0 and 1");
    if (p.integer("total_step") > 0) check_schedule(p, p.integer("total_step"));
  }

  void attach(tessera::AttachContext& ctx) override {
    validate(ctx.params);  // also for an adapter imported from PEFT's files, which skip validate()
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    params_ = ctx.params;
    init_r_ = ctx.params.integer("init_r");
    const double alpha = ctx.params.number("lora_alpha");
    // PEFT: scaling / (ranknum + 1e-5), ranknum a float32 r₀ that masking never changes.
    scaling_ = (alpha > 0 ? alpha : static_cast<double>(init_r_)) / static_cast<double>(static_cast<float>(init_r_) + 1e-5f);
    dropout_ = ctx.params.number("lora_dropout");
    auto sites = ctx.model.match_linear(ctx.targets);
    if (sites.empty()) throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets");
    const auto& opts = ctx.model.info().param_options;
    const bool peft_init = ctx.params.flag("init_lora_weights");
    at::NoGradGuard no_grad;
    for (auto* s : sites) {
      const auto in = s->in_features(), out = s->out_features();
      if (init_r_ > std::min(in, out))
        throw tessera::ParamError("init_r", "init_r " + std::to_string(init_r_) + " exceeds min(in, out) = " + std::to_string(std::min(in, out)) + " of " + s->name());
      Triplets t{s, at::randn({init_r_, in}, opts), at::randn({init_r_, 1}, opts), at::randn({out, init_r_}, opts), {}, {}, {}, {}};
      if (peft_init) t.A.normal_(0.0, 0.02), t.E.zero_(), t.B.normal_(0.0, 0.02);
      for (int i = 0; i < 3; ++i) t.part(i)->set_requires_grad(true);
      sites_.push_back(std::move(t));
    }
    install();
  }

  // w · mean over every P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F (PEFT adds it to the task loss).
  Tensor extra_loss() override {
    const double w = params_.number("orth_reg_weight");
    if (w == 0) return {};
    Tensor sum;
    for (auto& t : sites_)
      for (const Tensor& c : {at::matmul(t.A, t.A.t()), at::matmul(t.B.t(), t.B)}) {  // (r, r) each
        const Tensor d = at::linalg_vector_norm((c - at::eye(c.size(0), c.options())).reshape({-1}), 2);  // Frobenius
        sum = sum.defined() ? sum + d : d;
      }
    return sum * (w / static_cast<double>(2 * sites_.size()));
  }

  // The run's step count is known before step 0: a schedule without a budget phase is refused
  // then, not after the first update.
  void on_step(const tessera::StepInfo& info) override {
    if (info.step == 0 && params_.integer("total_step") == 0) check_schedule(params_, info.total);
  }

  // The rank allocator after each step; for an exact resume, its moving averages and the last
  // allocation's pattern (state() holds only the kept triplets).
  const void* extension(const char* id) const override {
    const std::string want(id);
    return want == TESSERA_EXT_METHOD_AFTER_STEP ? static_cast<const void*>(&after_step_) : want == TESSERA_EXT_METHOD_RESUME ? &resume_ : nullptr;
  }

  bool mergeable() const override { return true; }
  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& t : sites_) {
      t.site->remove(*owner_);
      t.folded = (delta_of(t) * scaling_).to(t.site->weight().base().scalar_type());
      t.site->weight().fold(t.folded);
    }
    merged_ = true;
  }
  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& t : sites_) t.site->weight().fold(-t.folded), t.folded = Tensor();
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (auto& t : sites_)
      for (int i = 0; i < 3; ++i) out[t.site->name() + "." + kParts[i]] = *t.part(i);
    return out;
  }

  // PEFT's keys and its save: base_model.model.<module>.lora_{A,E,B} (no ".weight"); once a
  // rank pattern exists, only the kept triplets (A, E rows; B columns), the pattern in the config.
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (auto& t : sites_) {
      const Tensor& idx = t.kept;  // the last allocation's, made once
      for (int i = 0; i < 3; ++i) {
        Tensor v = t.part(i)->detach();
        if (idx.defined()) v = v.index_select(i == 2 ? 1 : 0, idx.to(v.device()));
        out[key(t, kParts[i])] = v;
      }
    }
    return out;
  }

  // Full tensors (r₀ triplets), or PEFT's saved subset of k: the site then has rank k, as
  // PEFT resizes a module to its pattern on load (the scale stays s = alpha / (r₀ + 1e-5)).
  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    if (tensors.size() != 3 * sites_.size())
      throw std::runtime_error("adapter holds " + std::to_string(tensors.size()) + " tensors, this AdaLoRA has " + std::to_string(3 * sites_.size()));
    std::vector<std::int64_t> ranks;
    for (auto& t : sites_) {  // every tensor checked before any is copied
      std::int64_t k = -1;
      for (int i = 0; i < 3; ++i) {
        const auto it = tensors.find(key(t, kParts[i]));
        if (it == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + key(t, kParts[i]) + "'");
        const auto rows = it->second.dim() == 2 ? it->second.size(i == 2 ? 1 : 0) : -1;
        if (k < 0) k = rows;
        std::vector<std::int64_t> want = i == 0 ? std::vector<std::int64_t>{k, t.site->in_features()}
                                         : i == 1 ? std::vector<std::int64_t>{k, 1}
                                                  : std::vector<std::int64_t>{t.site->out_features(), k};
        if (k < 0 || k > init_r_ || it->second.sizes() != at::IntArrayRef(want))
          throw std::runtime_error("tensor '" + key(t, kParts[i]) + "' has shape " + c10::str(it->second.sizes()) + ", expected " +
                                   (k >= 0 && k <= init_r_ ? c10::str(at::IntArrayRef(want)) : "k ≤ init_r = " + std::to_string(init_r_) + " triplets"));
      }
      ranks.push_back(k);
    }
    at::NoGradGuard no_grad;
    bool resized = false;
    for (std::size_t s = 0; s < sites_.size(); ++s) {
      auto& t = sites_[s];
      for (int i = 0; i < 3; ++i) {
        const Tensor& v = tensors.at(key(t, kParts[i]));
        Tensor* p = t.part(i);
        if (v.sizes() == p->sizes()) p->copy_(v);
        else *p = v.to(p->options()).clone().set_requires_grad(true), resized = true;
      }
      for (int i = 0; i < 3; ++i) t.avg[i] = t.unc[i] = Tensor();
      t.keep = t.kept = Tensor();  // every row loaded is live
    }
    // PEFT's pattern for a resized adapter: k of r₀ kept (which k does not matter: the rows
    // were saved already chosen), so a folder we save again loads in PEFT.
    for (std::size_t s = 0; s < sites_.size(); ++s)
      sites_[s].loaded_pattern = resized ? at::arange(init_r_).lt(ranks[s]) : Tensor();
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    nlohmann::json pattern = nullptr;
    for (const auto& t : sites_) {
      targets.push_back(t.site->hf_path());
      // a trained site its own pattern; a loaded subset k leading trues of r₀
      Tensor keep = t.keep.defined() ? t.keep.cpu() : t.loaded_pattern;
      if (t.keep.defined() && t.loaded_pattern.defined()) {  // an allocation on a loaded subset: its bits at the subset's places among r₀
        Tensor full = at::zeros({init_r_}, at::kBool);
        full.index_put_({t.loaded_pattern.nonzero().reshape({-1})}, keep);
        keep = full;
      }
      if (!keep.defined()) continue;
      if (pattern.is_null()) pattern = nlohmann::json::object();
      std::vector<bool> bits;
      const Tensor k = keep.cpu();
      for (std::int64_t i = 0; i < k.size(0); ++i) bits.push_back(k[i].item<bool>());
      pattern[t.site->hf_path() + ".lora_E"] = bits;
    }
    const std::int64_t p_total = params_.integer("total_step");
    // PEFT refuses a config without a total_step leaving a budget phase, even to load it.
    const std::int64_t total = p_total > 0 ? p_total : run_total_ > 0 ? run_total_ : params_.integer("tinit") + params_.integer("tfinal") + 1;
    return nlohmann::json{{"peft_type", "ADALORA"},
                          {"r", 8},
                          {"init_r", init_r_},
                          {"target_r", params_.integer("target_r")},
                          {"lora_alpha", params_.number("lora_alpha")},
                          {"lora_dropout", params_.number("lora_dropout")},
                          {"tinit", params_.integer("tinit")},
                          {"tfinal", params_.integer("tfinal")},
                          {"deltaT", params_.integer("deltaT")},
                          {"beta1", params_.number("beta1")},
                          {"beta2", params_.number("beta2")},
                          {"orth_reg_weight", params_.number("orth_reg_weight")},
                          {"total_step", total},
                          {"rank_pattern", pattern},
                          {"init_lora_weights", params_.flag("init_lora_weights")},
                          {"target_modules", targets},
                          {"bias", "none"},
                          {"fan_in_fan_out", false},
                          {"task_type", nullptr},
                          {"inference_mode", true}}
        .dump(2);
  }

 private:
  static constexpr const char* kParts[3] = {"lora_A", "lora_E", "lora_B"};
  // P (Λ ⊙ Q) over the kept triplets once an allocation has masked some (what state() saves), else all: (out, in)
  static Tensor delta_of(const Triplets& t) {
    if (t.kept.defined() && t.kept.size(0) < t.A.size(0))
      return at::matmul(t.B.index_select(1, t.kept), t.A.index_select(0, t.kept) * t.E.index_select(0, t.kept));
    return at::matmul(t.B, t.A * t.E);
  }
  static std::string key(const Triplets& t, const char* name) { return "base_model.model." + t.site->hf_path() + "." + name; }

  static void check_schedule(const tessera::Params& p, std::int64_t total) {
    if (p.integer("tinit") >= total - p.integer("tfinal"))
      throw tessera::ParamError("tfinal", "tinit " + std::to_string(p.integer("tinit")) + " and tfinal " + std::to_string(p.integer("tfinal")) +
                                              " leave no budget phase in " + std::to_string(total) + " steps: lower one of them or train longer");
  }

  void install() {
    for (auto& t : sites_) {
      const Triplets* tp = &t;  // sites_ does not grow after attach
      t.site->add_branch(*owner_, [this, tp](const Tensor& x) {  // x: (..., in) -> (..., out)
        const Tensor h = dropout_ > 0 ? tessera::dropout(x, dropout_, model_->training()) : x;
        // Outside training, once an allocation has masked triplets, only the kept ones run:
        // what the saved adapter (the kept triplets alone) computes, to the bit.
        if (!model_->training() && tp->kept.defined() && tp->kept.size(0) < tp->A.size(0))
          return tessera::low_rank(h, tp->A.index_select(0, tp->kept) * tp->E.index_select(0, tp->kept), tp->B.index_select(1, tp->kept), scaling_);
        return tessera::low_rank(h, tp->A * tp->E, tp->B, scaling_);
      });
    }
  }

  // ---- the rank allocator (PEFT's RankAllocator) ------------------------------------------
  static void after_step_entry(void* self, const tessera::StepInfo* info) { static_cast<AdaLoRA*>(self)->after_step(*info); }

  static void save_resume(void* self, tessera::NamedTensors* out) {
    const auto* m = static_cast<AdaLoRA*>(self);
    (*out)["run_total"] = at::full({1}, m->run_total_, at::kLong);
    for (std::size_t i = 0; i < m->sites_.size(); ++i) {
      const auto& t = m->sites_[i];
      const std::string p = std::to_string(i) + ".";
      if (t.keep.defined()) (*out)[p + "keep"] = t.keep;
      for (int k = 0; k < 3; ++k)
        if (t.avg[k].defined()) (*out)[p + "avg" + std::to_string(k)] = t.avg[k], (*out)[p + "unc" + std::to_string(k)] = t.unc[k];
    }
  }
  static void load_resume(void* self, const tessera::NamedTensors* in) {
    auto* m = static_cast<AdaLoRA*>(self);
    m->run_total_ = in->at("run_total").item<std::int64_t>();
    for (std::size_t i = 0; i < m->sites_.size(); ++i) {
      auto& t = m->sites_[i];
      const std::string p = std::to_string(i) + ".";
      auto get = [&](const std::string& k, const Tensor& like) {
        const auto it = in->find(p + k);
        return it == in->end() ? Tensor() : it->second.to(like.device(), it->second.scalar_type() == at::kBool ? at::kBool : like.scalar_type()).clone();
      };
      t.keep = get("keep", t.E);
      t.kept = t.keep.defined() ? t.keep.nonzero().reshape({-1}) : Tensor();
      for (int k = 0; k < 3; ++k) t.avg[k] = get("avg" + std::to_string(k), *t.part(k)), t.unc[k] = get("unc" + std::to_string(k), *t.part(k));
    }
  }

  void after_step(const tessera::StepInfo& info) {
    const std::int64_t total = params_.integer("total_step") > 0 ? params_.integer("total_step") : info.total;
    if (run_total_ != total) check_schedule(params_, total);  // the first step, or a resumed run of another length
    run_total_ = total;
    const std::int64_t step = info.step, final_from = total - params_.integer("tfinal");
    at::NoGradGuard no_grad;
    if (step < final_from) {
      update_importance();
      const auto [budget, mask] = budget_at(step, total);
      if (mask) mask_to_budget(budget);
    } else if (step == final_from) {
      mask_to_budget(target_budget());  // the final pattern, forced; the averages start over
      for (auto& t : sites_)
        for (int i = 0; i < 3; ++i) t.avg[i] = t.unc[i] = Tensor();
    } else {
      for (auto& t : sites_)
        if (t.keep.defined()) t.E.masked_fill_(t.keep.logical_not().unsqueeze(1), 0.0);
    }
  }

  std::int64_t init_budget() const {
    std::int64_t n = 0;
    for (const auto& t : sites_) n += t.A.size(0);
    return n;
  }
  std::int64_t target_budget() const { return params_.integer("target_r") * static_cast<std::int64_t>(sites_.size()); }

  // The cubic schedule: the full budget through tinit, then down to the target by step
  // total − tfinal, an allocation every deltaT steps.
  std::pair<std::int64_t, bool> budget_at(std::int64_t step, std::int64_t total) const {
    const std::int64_t tinit = params_.integer("tinit"), tfinal = params_.integer("tfinal");
    if (step <= tinit) return {init_budget(), false};
    if (step > total - tfinal) return {target_budget(), true};
    const double c = 1.0 - static_cast<double>(step - tinit) / static_cast<double>(total - tfinal - tinit);
    const auto budget = static_cast<std::int64_t>(static_cast<double>(init_budget() - target_budget()) * std::pow(c, 3.0) + static_cast<double>(target_budget()));
    return {budget, step % params_.integer("deltaT") == 0};
  }

  // I = |θ ⊙ ∂L/∂θ|; Ī ← β1 Ī + (1 − β1) I; Ū ← β2 Ū + (1 − β2) |I − Ī| (with the new Ī).
  void update_importance() {
    const double b1 = params_.number("beta1"), b2 = params_.number("beta2");
    for (auto& t : sites_)
      for (int i = 0; i < 3; ++i) {
        const Tensor& p = *t.part(i);
        if (!t.avg[i].defined()) t.avg[i] = at::zeros_like(p), t.unc[i] = at::zeros_like(p);
        const Tensor ipt = p.grad().defined() ? (p.detach() * p.grad()).abs() : at::zeros_like(p);
        t.avg[i] = t.avg[i] * b1 + ipt * (1 - b1);
        t.unc[i] = t.unc[i] * b2 + (ipt - t.avg[i]).abs() * (1 - b2);
      }
  }

  // Each triplet's score s(λᵢ) + mean s(Qᵢ,·) + mean s(P·,ᵢ), s = Ī ⊙ Ū; over all sites, the
  // (r_total − budget) lowest get λ = 0 (ties with the k-th lowest too, as PEFT masks ≤).
  void mask_to_budget(std::int64_t budget) {
    std::vector<Tensor> scores;
    for (auto& t : sites_) {
      if (!t.avg[0].defined()) return;  // no importance yet (an allocation before any update): nothing to rank by
      const Tensor sA = (t.avg[0] * t.unc[0]).mean(1);            // (r)
      const Tensor sE = (t.avg[1] * t.unc[1]).reshape({-1});      // (r)
      const Tensor sB = (t.avg[2] * t.unc[2]).mean(0);            // (r)
      scores.push_back(sE + (sA + sB));
    }
    const std::int64_t k = init_budget() - budget;
    if (k <= 0) return;
    const double threshold = std::get<0>(at::kthvalue(at::cat(scores), k)).item<double>();
    for (std::size_t s = 0; s < sites_.size(); ++s) {
      auto& t = sites_[s];
      t.keep = scores[s].gt(threshold);
      t.kept = t.keep.nonzero().reshape({-1});
      t.E.masked_fill_(t.keep.logical_not().unsqueeze(1), 0.0);
    }
  }

  tessera_method_after_step_v1 after_step_{{sizeof(tessera_method_after_step_v1), 1}, this, &after_step_entry};
  tessera_method_resume_v1 resume_{{sizeof(tessera_method_resume_v1), 1}, this, &save_resume, &load_resume};
  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  tessera::Params params_;
  std::vector<Triplets> sites_;
  std::int64_t init_r_ = 0, run_total_ = 0;
  double scaling_ = 1.0, dropout_ = 0.0;
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(AdaLoRA, "adalora", "1.0.0", "reparameterized",
               "SVD-shaped low-rank update whose singular values are pruned to a rank budget by importance (AdaLoRA)",
               "Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen & Zhao 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, ICLR 2023, "
               "arXiv:2303.10512")
