// LoHa: low-rank Hadamard product (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product
// for Communication-Efficient Federated Learning", arXiv:2108.06098; LyCORIS's LoHa, as PEFT
// has it). The math and every key: README.md beside this.
//
//   ΔW = s · (W1a W1b) ⊙ (W2a W2b)      W1a, W2a: (out, r); W1b, W2b: (r, in); s = alpha / r
//   y  = (W + ΔW) x + b
//
// The Hadamard product has rank up to r², from 4r(out + in)/2 numbers. Unlike LoRA's, the
// update is no product of skinny factors of x: it is formed as a weight (out, in), as PEFT
// forms it — but added to W for the site's one product, not run as a second product with x.
// Training-time options as PEFT's: rank dropout (rows of ΔW dropped, the rest rescaled by the
// kept share) and module dropout (the whole update skipped for a step).
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>

namespace {

using tessera::Tensor;

struct Hada {
  tessera::LinearSite* site;
  Tensor w1a, w1b, w2a, w2b;
  double scaling;
  Tensor delta() const { return at::matmul(w1a, w1b) * at::matmul(w2a, w2b) * scaling; }  // (out, in)
  Tensor folded;  // while merged
};

class LoHa final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"r", ParamType::Int, std::int64_t{8}, "rank of each of the two factor pairs", 1, 65536, {}},
        {"alpha", ParamType::Float, 8.0, "scale numerator: s = alpha / r", 0, std::nullopt, {}},
        {"rank_dropout", ParamType::Float, 0.0, "training: each output row of ΔW dropped with this probability, the rest divided by the kept share", 0, 0.999, {}},
        {"module_dropout", ParamType::Float, 0.0, "training: the whole update skipped for a forward with this probability", 0, 1.0, {}},
        {"init_weights", ParamType::Bool, true, "true: W2b = 0 (the update starts at 0), the rest Kaiming-uniform; false: all four random", {}, {}, {}},
        {"rank_pattern", ParamType::NumberTable, tessera::NumberTable{}, "PEFT's per-target ranks: not supported, refused when given", {}, {}, {}},
        {"alpha_pattern", ParamType::NumberTable, tessera::NumberTable{}, "PEFT's per-target alphas: not supported, refused when given", {}, {}, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    for (const char* k : {"rank_pattern", "alpha_pattern"})
      if (!p.get<tessera::NumberTable>(k).empty()) throw tessera::ParamError(k, std::string("LoHa here takes one r and one alpha: ") + k + " is not supported");
  }

  void attach(tessera::AttachContext& ctx) override {
    validate(ctx.params);  // also for an adapter imported from PEFT's files, which skip validate()
    owner_ = &ctx.owner;
    compute_ = ctx.model.info().options.dtype().toScalarType();
    model_ = &ctx.model;
    params_ = ctx.params;
    sites_ = ctx.model.match_linear(ctx.targets);
    if (sites_.empty()) throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets");
    const auto r = ctx.params.integer("r");
    const double scaling = ctx.params.number("alpha") / static_cast<double>(r);
    const auto& opts = ctx.model.info().param_options;
    at::NoGradGuard no_grad;
    // nn.init.kaiming_uniform_(a = √5) as PEFT calls it: U(−1/√fan_in, 1/√fan_in), fan_in = size(1).
    auto kaiming = [&](std::int64_t rows, std::int64_t cols) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(cols));
      return at::empty({rows, cols}, opts).uniform_(-bound, bound);
    };
    for (auto* s : sites_) {
      const auto in = s->in_features(), out = s->out_features();
      Hada h{s, kaiming(out, r), kaiming(r, in), kaiming(out, r), ctx.params.flag("init_weights") ? at::zeros({r, in}, opts) : kaiming(r, in), scaling, {}};
      for (auto* t : {&h.w1a, &h.w1b, &h.w2a, &h.w2b}) t->set_requires_grad(true);
      hadas_.push_back(h);
    }
    install();
  }

  bool mergeable() const override { return true; }
  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& h : hadas_) {
      h.site->remove(*owner_);
      h.folded = h.delta().to(h.site->weight().base().scalar_type());
      h.site->weight().fold(h.folded);
    }
    merged_ = true;
  }
  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& h : hadas_) h.site->weight().fold(-h.folded), h.folded = Tensor();
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (auto& h : hadas_)
      for (const auto& [name, t] : parts(h)) out[h.site->name() + "." + name] = *t;
    return out;
  }

  // PEFT's keys: base_model.model.<module path>.hada_w{1,2}_{a,b} (no ".weight").
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (auto& h : hadas_)
      for (const auto& [name, t] : parts(h)) out[key(h, name)] = *t;
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    if (tensors.size() != 4 * hadas_.size())
      throw std::runtime_error("adapter holds " + std::to_string(tensors.size()) + " tensors, this LoHa has " + std::to_string(4 * hadas_.size()));
    for (int pass = 0; pass < 2; ++pass)  // every tensor checked before any is copied
      for (auto& h : hadas_)
        for (const auto& [name, t] : parts(h)) {
          const auto it = tensors.find(key(h, name));
          if (it == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + key(h, name) + "'");
          if (it->second.sizes() != t->sizes())
            throw std::runtime_error("tensor '" + key(h, name) + "' has shape " + c10::str(it->second.sizes()) + ", expected " + c10::str(t->sizes()));
          if (pass == 1) {
            at::NoGradGuard no_grad;
            t->copy_(it->second);
          }
        }
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& h : hadas_) targets.push_back(h.site->hf_path());
    return nlohmann::json{{"peft_type", "LOHA"},
                          {"r", params_.integer("r")},
                          {"alpha", params_.number("alpha")},
                          {"rank_dropout", params_.number("rank_dropout")},
                          {"module_dropout", params_.number("module_dropout")},
                          {"init_weights", params_.flag("init_weights")},
                          {"use_effective_conv2d", false},
                          {"target_modules", targets},
                          {"rank_pattern", nlohmann::json::object()},
                          {"alpha_pattern", nlohmann::json::object()},
                          {"task_type", nullptr},
                          {"inference_mode", true}}
        .dump(2);
  }

 private:
  static std::vector<std::pair<const char*, Tensor*>> parts(Hada& h) {
    return {{"hada_w1_a", &h.w1a}, {"hada_w1_b", &h.w1b}, {"hada_w2_a", &h.w2a}, {"hada_w2_b", &h.w2b}};
  }
  static std::string key(const Hada& h, const char* name) { return "base_model.model." + h.site->hf_path() + "." + name; }

  // ΔW of this forward, f32 (out, in), or undefined when module dropout skips the update.
  Tensor step_delta(const Hada& h) const {
    const bool training = model_->training();
    const double rank_dropout = params_.number("rank_dropout"), module_dropout = params_.number("module_dropout");
    if (training && module_dropout > 0 && at::rand({1}).item<double>() <= module_dropout) return {};  // PEFT: kept when rand > p
    Tensor d = h.delta();
    if (training && rank_dropout > 0) {  // PEFT's rank dropout: rows kept when rand > p, divided by the kept share
      Tensor keep = at::rand({d.size(0)}, d.options()).gt(rank_dropout).to(d.scalar_type());
      d = d * (keep / keep.mean()).unsqueeze(1);
    }
    return d;
  }

  // On a float32 model ΔW joins W for the site's one product. On a half-precision model an
  // update much smaller than W would vanish in W + ΔW's rounding: there it is PEFT's second
  // product, x ΔWᵀ in float32.
  void install() {
    for (auto& h : hadas_) {
      const Hada* hp = &h;  // hadas_ does not grow after attach
      if (compute_ == at::kFloat) {
        h.site->add_weight_delta(*owner_, [this, hp] {
          const Tensor d = step_delta(*hp);
          return d.defined() ? d : at::zeros({hp->site->out_features(), hp->site->in_features()}, hp->w1a.options());
        });
      } else {
        h.site->add_branch(*owner_, [this, hp](const Tensor& x) {
          const Tensor d = step_delta(*hp);
          return d.defined() ? at::linear(x.to(at::kFloat), d).to(x.scalar_type()) : at::zeros_like(x.narrow(-1, 0, 1)).expand(with_out(x, hp));
        });
      }
    }
  }
  static std::vector<std::int64_t> with_out(const Tensor& x, const Hada* h) {
    auto shape = x.sizes().vec();
    shape.back() = h->site->out_features();
    return shape;
  }

  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  tessera::Params params_;
  std::vector<tessera::LinearSite*> sites_;
  std::vector<Hada> hadas_;
  c10::ScalarType compute_ = at::kFloat;
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(LoHa, "loha", "1.0.0", "reparameterized", "Low-rank Hadamard product update s·(W1a W1b) ⊙ (W2a W2b) of linear weights (LoHa)",
               "Hyeon-Woo, Ye-Bin & Oh 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning, arXiv:2108.06098")
