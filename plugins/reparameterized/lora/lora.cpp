// LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv:2106.09685); rsLoRA scaling
// (Kalajdzievski 2023, arXiv:2312.03732). The math and every key: README.md beside this.
//
//   y = W x + b + s · B A dropout(x)      A: (r, in), B: (out, r)
//   s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))
//
// Unmerged, the update is a parallel branch of the linear site; merging folds s·B·A
// into the base weight (an explicit step) and removes the branch.
//
// DoRA (Liu et al. 2024, arXiv:2402.09353; use_dora), PEFT's form: with the per-row norm
// n = ‖W + s·B A‖ treated as a constant (detached) and the trained magnitude m (out),
//   y = (m/n) ⊙ (W x + s·B A x) + b
// computed without a second product with W: an output scale m/n on the site's W x + b, and a
// branch (1 − m/n) ⊙ b + (m/n) ⊙ s·B A x. n comes from ‖W‖² (once) + 2s ⟨W, B A⟩ + s² ‖B A‖²
// per row, i.e. W Aᵀ (out × r) and A Aᵀ (r × r), never an (out × in) temporary. In training
// with dropout PEFT reads the base product of the dropped input,
//   y = W x + b + (m/n − 1) ⊙ W drop(x) + (m/n) ⊙ s·B A drop(x),
// and so does the branch then (the one case with a second product).
//
// PiSSA (Meng et al. 2024, arXiv:2404.02948) and OLoRA (Büyükakyüz 2024, arXiv:2406.01775)
// initialise A, B from W's principal singular triplets or its QR factors; PEFT then writes
// W − s·B₀A₀ into the base. Here the base stays as it is and a frozen branch −s·B₀A₀ x takes
// the residual's place (rank r, no dense copy): y = W x + b + s·B A drop(x) − s·B₀ A₀ x. The
// files are PEFT's conversion to a plain LoRA of rank 2r on the original base,
// A' = [A; A₀], B' = [B, −B₀] (r and lora_alpha doubled, √2 under rsLoRA), which is what
// load_state() reads back.
#include <tessera/dropout.h>
#include <tessera/low_rank.h>
#include <tessera/plugin.h>
#include <tessera/shared_input.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <memory>
#include <regex>
#include <tuple>

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
  Tensor A0, B0;  // PiSSA / OLoRA: the initial A and B, frozen; undefined otherwise
  Tensor m;       // DoRA: (out) magnitude, trained; undefined without DoRA
  Tensor folded;  // DoRA, while merged: what merge() added to the base
  Tensor fa_projection;  // LoRA-FA: (1/s²)(A Aᵀ + 1e-8 I)⁺, (r, r) f32; A is frozen, so made once (again after a load)
  Tensor delta() const { return at::matmul(B, A) * scaling; }  // (out, in)
  // What merge() folds: s·B A, less s·B₀ A₀ after a PiSSA / OLoRA init.
  Tensor folded_delta() const {
    at::NoGradGuard no_grad;
    return A0.defined() ? delta() - at::matmul(B0, A0) * scaling : delta();
  }

  // DoRA's n = ‖W + s·B A‖ per output row, (out) f32, outside autograd (the paper's §4.3).
  Tensor weight_norm() const {
    at::NoGradGuard no_grad;
    const Tensor W = site->weight().base().to(A.scalar_type());
    const Tensor a = A.detach(), b = B.detach();
    const Tensor cross = (b * at::matmul(W, a.t())).sum(1);            // ⟨W_o, (B A)_o⟩
    const Tensor sq = (at::matmul(b, at::matmul(a, a.t())) * b).sum(1);  // ‖(B A)_o‖²
    // ‖W_o‖² of the base as it is now (another instance may have merged into it since attach)
    return (W.square().sum(1) + cross * (2.0 * scaling) + sq * (scaling * scaling)).clamp_min(0.0).sqrt();
  }
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
         "\"false\": A and B both Kaiming-uniform (nonzero start, for tests); \"pissa\": W's r principal singular triplets "
         "(\"pissa_niter_N\": by randomised SVD with N subspace iterations); \"olora\": W's QR factors",
         std::nullopt, std::nullopt, {}},
        {"use_dora", ParamType::Bool, false, "DoRA: a trained magnitude per output row times the normalised W + s·B·A (Liu et al. 2024)", std::nullopt,
         std::nullopt, {}},
        {"lora_fa", ParamType::Bool, false,
         "LoRA-FA (Zhang et al. 2023): A frozen at its init, B trained on the gradient projected as PEFT's LoraFAOptimizer projects it, "
         "(1/s²) ∂B (A Aᵀ + 1e-8 I)⁺",
         std::nullopt, std::nullopt, {}},
        {"rank_pattern", ParamType::NumberTable, tessera::NumberTable{}, "per-target rank: {pattern = r}", std::nullopt, std::nullopt, {}},
        {"alpha_pattern", ParamType::NumberTable, tessera::NumberTable{}, "per-target alpha: {pattern = alpha}", std::nullopt, std::nullopt, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    const std::string& init = p.text("init_lora_weights");
    static const std::regex niter("pissa_niter_[0-9]+");
    if (init != "true" && init != "gaussian" && init != "false" && init != "pissa" && init != "olora" && !std::regex_match(init, niter))
      throw tessera::ParamError("init_lora_weights", "init_lora_weights must be true, gaussian, false, pissa, pissa_niter_N or olora, not '" + init + "'");
    if ((init.rfind("pissa", 0) == 0 || init == "olora") && p.flag("use_rslora") &&
        (!p.get<tessera::NumberTable>("rank_pattern").empty() || !p.get<tessera::NumberTable>("alpha_pattern").empty()))
      throw tessera::ParamError("use_rslora", "a " + init + " adapter's conversion to LoRA cannot keep rank_pattern or alpha_pattern under use_rslora (as PEFT refuses)");
    if (p.flag("lora_fa") && p.flag("use_dora"))
      throw tessera::ParamError("lora_fa", "lora_fa with use_dora is not supported: LoRA-FA's projection is for B of a plain LoRA update");
    if (p.flag("use_dora") && (init.rfind("pissa", 0) == 0 || init == "olora"))
      throw tessera::ParamError("use_dora", "use_dora with init_lora_weights = " + init + " is not supported: choose one");
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
    dora_ = p.flag("use_dora");
    compute_ = ctx.model.info().options.dtype().toScalarType();
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
      Tensor A, B, A0, B0;
      if (init.rfind("pissa", 0) == 0 || init == "olora") {  // its randomised SVD's draw is the only one: seeded, it is svd_lowrank's
        std::tie(A, B) = principal_init(site->weight().base().to(opts), r, scaling, init);
        A0 = A.clone(), B0 = B.clone();
      } else {  // nn.Linear's default init, kaiming_uniform(a=√5): U(-1/√fan_in, 1/√fan_in)
        A = at::empty({r, in}, opts), B = at::zeros({out, r}, opts);
        if (init == "gaussian") A.normal_(0.0, 1.0 / static_cast<double>(r));
        else A.uniform_(-1.0 / std::sqrt(static_cast<double>(in)), 1.0 / std::sqrt(static_cast<double>(in)));
        if (init == "false") B.uniform_(-1.0 / std::sqrt(static_cast<double>(r)), 1.0 / std::sqrt(static_cast<double>(r)));
      }
      A.set_requires_grad(!p.flag("lora_fa"));  // LoRA-FA: A stays its init, a fixed down-projection
      B.set_requires_grad(true);
      adapters_.push_back({site, A, B, scaling, A0, B0, {}, {}});
      if (dora_) {  // m starts at n, so the model starts where plain LoRA would
        auto& a = adapters_.back();
        a.m = a.weight_norm().clone().set_requires_grad(true);
      }
    }
    install();
  }

  bool mergeable() const override { return true; }

  void merge() override {
    if (merged_) return;
    for (auto& a : adapters_) {
      a.site->remove(*owner_);  // the fold replaces the branch; unmerge() installs it again
      if (dora_) {  // W ↦ (m/n) ⊙ (W + s·B A), row by row
        at::NoGradGuard no_grad;
        const Tensor W = a.site->weight().base().to(a.A.scalar_type());
        a.folded = ((a.m / a.weight_norm()).unsqueeze(1) * (W + a.delta()) - W).to(a.site->weight().base().scalar_type());
        a.site->weight().fold(a.folded);
      } else {
        a.folded = a.folded_delta().to(a.site->weight().base().scalar_type());
        a.site->weight().fold(a.folded);
      }
    }
    merged_ = true;
  }

  void unmerge() override {
    if (!merged_) return;
    for (auto& a : adapters_) a.site->weight().fold(-a.folded), a.folded = Tensor();
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (const auto& a : adapters_) {
      if (!params_.flag("lora_fa")) out[a.site->name() + ".lora_A"] = a.A;
      out[a.site->name() + ".lora_B"] = a.B;
      if (dora_) out[a.site->name() + ".lora_magnitude_vector"] = a.m;
    }
    return out;
  }

  // LoRA-FA (Zhang et al. 2023, §3, as PEFT's LoraFAOptimizer): with A fixed, the update
  // s·B A moves as full fine-tuning's would, projected on A's row space, when B's gradient is
  // (1/s²) ∂B (A Aᵀ)⁻¹; (A Aᵀ + 1e-8 I)⁺ as PEFT takes it. In float32 (PEFT autocasts this
  // product to bfloat16 where bfloat16 is available); the host's AdamW then steps B.
  void after_backward() override {
    if (!params_.flag("lora_fa")) return;
    at::NoGradGuard no_grad;
    for (auto& a : adapters_) {
      if (!a.B.grad().defined()) continue;
      if (!a.fa_projection.defined()) {
        const Tensor A = a.A.to(at::kFloat);                                             // (r, in)
        const Tensor gram = at::matmul(A, A.t()) + at::eye(A.size(0), A.options()) * 1e-8;  // (r, r)
        a.fa_projection = at::linalg_pinv(gram) / (a.scaling * a.scaling);
      }
      a.B.mutable_grad().copy_(at::matmul(a.B.grad().to(at::kFloat), a.fa_projection));  // (out, r)
    }
  }

  // HF PEFT's file keys: base_model.model.<module path>.lora_{A,B}.weight (DoRA:
  // .lora_magnitude_vector, without ".weight", as PEFT saves it)
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& a : adapters_) {
      if (a.A0.defined()) {  // PEFT's conversion: a plain LoRA of rank 2r on the original base
        at::NoGradGuard no_grad;
        out[key(a, "lora_A")] = at::cat({a.A.detach(), a.A0}, 0);
        out[key(a, "lora_B")] = at::cat({a.B.detach(), -a.B0}, 1);
        continue;
      }
      out[key(a, "lora_A")] = a.A;
      out[key(a, "lora_B")] = a.B;
      if (dora_) out[magnitude_key(a)] = a.m;
    }
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    for (auto& a : adapters_) a.fa_projection = Tensor();  // A may change
    const std::size_t per = dora_ ? 3 : 2;
    if (tensors.size() != per * adapters_.size()) {
      bool magnitudes = false;
      for (const auto& [k, _] : tensors) magnitudes |= k.size() > 22 && k.compare(k.size() - 22, 22, ".lora_magnitude_vector") == 0;
      throw std::runtime_error("adapter holds " + std::to_string(tensors.size()) + " tensors, this LoRA has " + std::to_string(per * adapters_.size()) +
                               (magnitudes && !dora_ ? ": it is a DoRA adapter (use_dora = true)" : !magnitudes && dora_ ? ": it has no DoRA magnitudes (use_dora = false)" : ""));
    }
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    for (int pass = 0; pass < 2; ++pass)  // every tensor checked before any is copied
      for (auto& a : adapters_) {
        std::vector<std::pair<std::string, Tensor*>> parts = {{key(a, "lora_A"), &a.A}, {key(a, "lora_B"), &a.B}};
        if (dora_) parts.emplace_back(magnitude_key(a), &a.m);
        for (auto& [k, t] : parts) {
          auto it = tensors.find(k);
          if (it == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + k + "'");
          // After a PiSSA / OLoRA init the file holds [A; A₀] and [B, −B₀]: twice the rank.
          auto expected = t->sizes().vec();
          if (a.A0.defined()) expected[t == &a.A ? 0 : 1] *= 2;
          if (it->second.sizes() != expected)
            throw std::runtime_error("tensor '" + k + "' has shape " + c10::str(it->second.sizes()) + ", expected " + c10::str(expected) +
                                     (a.A0.defined() ? " (a PiSSA / OLoRA adapter converted to LoRA: twice the rank)" : ""));
          if (pass == 1) {
            at::NoGradGuard no_grad;
            const Tensor v = it->second.to(t->options());
            if (!a.A0.defined()) t->copy_(v);
            else if (t == &a.A) a.A.copy_(v.narrow(0, 0, a.A.size(0))), a.A0.copy_(v.narrow(0, a.A.size(0), a.A.size(0)));
            else a.B.copy_(v.narrow(1, 0, a.B.size(1))), a.B0.copy_(-v.narrow(1, a.B.size(1), a.B.size(1)));
          }
        }
      }
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& a : adapters_) targets.push_back(a.site->hf_path());
    // After a PiSSA / OLoRA init the file is PEFT's conversion: rank and alpha doubled (alpha
    // ×√2 under rsLoRA, where s = alpha/√r), a plain LoRA on the original base.
    const std::string init = params_.text("init_lora_weights");
    const bool converted = init.rfind("pissa", 0) == 0 || init == "olora";
    const double rank_factor = converted ? 2.0 : 1.0, alpha_factor = !converted ? 1.0 : params_.flag("use_rslora") ? std::sqrt(2.0) : 2.0;
    nlohmann::json rank = nlohmann::json::object();
    for (const auto& [k, v] : params_.get<tessera::NumberTable>("rank_pattern")) rank[k] = static_cast<std::int64_t>(v * rank_factor);
    nlohmann::json alphas = nlohmann::json::object();
    for (const auto& [k, v] : params_.get<tessera::NumberTable>("alpha_pattern")) alphas[k] = v * (converted ? 2.0 : 1.0);
    nlohmann::json j = {
        {"peft_type", "LORA"},
        {"r", static_cast<std::int64_t>(static_cast<double>(params_.integer("r")) * rank_factor)},
        {"lora_alpha", params_.number("lora_alpha") * alpha_factor},
        {"lora_dropout", params_.number("lora_dropout")},
        {"use_rslora", params_.flag("use_rslora")},
        {"use_dora", dora_},
        {"init_lora_weights", init == "gaussian" ? nlohmann::json("gaussian") : nlohmann::json(init == "true" || converted)},
        {"target_modules", targets},
        {"rank_pattern", rank},
        {"alpha_pattern", alphas},
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
  // PiSSA: A = √(S_r/s) Uhᵣ, B = Vᵣ √(S_r/s) from W = V S Uh (full SVD, or PEFT's randomised
  // one: torch.svd_lowrank's algorithm, Halko et al. 2009, with this run's random draws);
  // OLoRA: A = R_r, B = Q_r from W = Q R. W: (out, in) f32 -> (A (r, in), B (out, r)).
  static std::pair<Tensor, Tensor> principal_init(const Tensor& W, std::int64_t r, double scaling, const std::string& init) {
    at::NoGradGuard no_grad;
    if (init == "olora") {
      const auto [Q, R] = at::linalg_qr(W);
      return {R.narrow(0, 0, r).contiguous(), Q.narrow(1, 0, r).contiguous()};
    }
    Tensor V, S, Uh;
    if (init == "pissa") {
      std::tie(V, S, Uh) = at::linalg_svd(W, false);
    } else {
      const auto niter = std::stoll(init.substr(std::string("pissa_niter_").size()));
      const bool wide = W.size(0) < W.size(1);
      const Tensor M = wide ? W.t() : W;  // tall
      Tensor Q = std::get<0>(at::linalg_qr(at::matmul(M, at::randn({M.size(1), r}, M.options()))));
      for (std::int64_t i = 0; i < niter; ++i) {
        Q = std::get<0>(at::linalg_qr(at::matmul(M.t(), Q)));
        Q = std::get<0>(at::linalg_qr(at::matmul(M, Q)));
      }
      auto [U, s, Vh] = at::linalg_svd(at::matmul(Q.t(), M), false);
      Tensor left = at::matmul(Q, U), right = Vh.t();  // M ≈ left diag(s) rightᵀ
      if (wide) std::swap(left, right);
      V = left, S = s, Uh = right.t();
    }
    const Tensor root = (S.narrow(0, 0, r) / scaling).sqrt();
    return {(root.unsqueeze(1) * Uh.narrow(0, 0, r)).contiguous(), (V.narrow(1, 0, r) * root.unsqueeze(0)).contiguous()};
  }

  static std::string magnitude_key(const Adapter& a) { return "base_model.model." + a.site->hf_path() + ".lora_magnitude_vector"; }

  bool dropping() const { return dropout_ > 0 && model_->training(); }
  // DoRA's second-product form: while dropout trains (PEFT's form), and on half-precision
  // models, where m/n rounded to the compute dtype would hide the magnitudes' small moves
  // (PEFT computes (m/n − 1)·W x in float32 there).
  bool dora_branch_only() const { return dropping() || compute_ != at::kFloat; }

  // DoRA: the output scale m/n on W x + b (1 in the second-product form: the branch carries
  // it then), and the branch that completes PEFT's sum.
  void install_dora(const Adapter* ad) {
    ad->site->add_output_scale(*owner_, [this, ad] {
      return dora_branch_only() ? at::ones_like(ad->m).to(compute_) : (ad->m / ad->weight_norm()).to(compute_);
    });
    ad->site->add_branch(*owner_, [this, ad](const Tensor& x) {  // x: (..., in) -> (..., out)
      if (dora_branch_only()) {  // (m/n − 1) ⊙ W h + (m/n) ⊙ s·B A h in float32, h = drop(x)
        const Tensor g = ad->m / ad->weight_norm();  // (out) f32
        const Tensor h = (dropping() ? tessera::dropout(x, dropout_, true) : x).to(at::kFloat);
        const Tensor y = (g - 1) * at::linear(h, ad->site->weight().base().to(at::kFloat)) + g * tessera::low_rank(h, ad->A, ad->B, ad->scaling);
        return y.to(x.scalar_type());
      }
      const Tensor g = (ad->m / ad->weight_norm()).to(x.scalar_type());  // (out)
      Tensor y = g * tessera::low_rank(x, ad->A, ad->B, ad->scaling);
      if (auto* bias = ad->site->bias()) y = y + (1 - g) * bias->value().to(x.scalar_type());
      return y;
    });
  }

  // Plain updates through low_rank_group, grouped by LinearSite::input_group(): the adapters
  // of q, k and v (of gate and up) read one input, so it is read once, their dropouts drawn
  // in one pass, and the input kept once instead of a dropped copy per adapter.
  // A bf16 model computes in bf16; the f32 masters get their gradients in f32.
  void install_plain() {
    std::map<std::string, std::vector<const Adapter*>> by_input;
    for (const auto& a : adapters_)
      if (!a.A0.defined()) by_input[a.site->input_group()].push_back(&a);
    shared_.clear();
    for (auto& [_, members] : by_input) {
      // Weighed per row (a gated or route group), each adapter takes its site's weight on its
      // r-wide product, ((drop(x) Aᵀ) ∘ rows) s Bᵀ: the host hands it to each branch, and the
      // group reads every member's at the first call (LinearSite::row_weights).
      auto shared = std::make_unique<tessera::SharedInput>(members.size(), [this, members = members](const Tensor& x) {
        std::vector<tessera::LowRankFactors> factors;
        std::vector<Tensor> rows;
        for (const auto* m : members) {
          factors.push_back({m->A, m->B, m->scaling});
          if (Tensor r = m->site->row_weights(*owner_, x); r.defined()) rows.push_back(std::move(r));
        }
        if (!rows.empty() && rows.size() != members.size()) throw std::logic_error("LoRA: some sites of one input are weighed per row and some not");
        return tessera::low_rank_group(x, factors, dropout_, model_->training(), rows);  // x: (..., in) -> (..., out_i) each
      });
      for (std::size_t i = 0; i < members.size(); ++i)
        members[i]->site->add_row_scaled_branch(*owner_, [group = shared.get(), i](const Tensor& x, const Tensor&) { return (*group)(i, x); });
      shared_.push_back(std::move(shared));
    }
  }

  void install() {
    if (!dora_) install_plain();
    for (auto& a : adapters_) {
      const Adapter* ad = &a;  // adapters_ does not grow after attach
      if (dora_) {
        install_dora(ad);
        continue;
      }
      if (!ad->A0.defined()) continue;  // in a group above
      // PiSSA / OLoRA: the residual's part, −s·B₀A₀ x, on the undropped input as W's is. Both
      // terms are about as large as the output's principal part and the training moves their
      // difference: in float32 on half-precision models, rounded once.
      a.site->add_branch(*owner_, [this, ad](const Tensor& x) {  // x: (..., in) -> (..., out)
        const Tensor h = dropout_ > 0 ? tessera::dropout(x, dropout_, model_->training()) : x;
        const auto dt = x.scalar_type();
        return (tessera::low_rank(h.to(at::kFloat), ad->A, ad->B, ad->scaling) - tessera::low_rank(x.to(at::kFloat), ad->A0, ad->B0, ad->scaling)).to(dt);
      });
    }
  }

  const tessera::Owner* owner_ = nullptr;  // the host's handle for this instance
  tessera::ModelView* model_ = nullptr;
  tessera::Params params_;
  std::vector<Adapter> adapters_;
  std::vector<std::unique_ptr<tessera::SharedInput>> shared_;  // the plain updates, by input (install_plain)
  double dropout_ = 0.0;
  bool dora_ = false, merged_ = false;
  c10::ScalarType compute_ = at::kFloat;
};

}  // namespace

TESSERA_PLUGIN(Lora, "lora", "1.0.0", "reparameterized",
               "Low-rank update B·A of linear weights, scaled by alpha/r (rsLoRA: alpha/sqrt(r))",
               "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685")
