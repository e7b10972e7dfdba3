// Compacter and Compacter++ (Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank
// Hypercomplex Adapter Layers", arXiv:2106.04647): bottleneck adapters whose two projections
// are parameterized hypercomplex multiplication (PHM) layers, placed and named as AdapterHub's
// `adapters` package does (CompacterConfig, CompacterPlusPlusConfig: a BnConfig with
// phm_layer on). The math and every key: README.md beside this.
//
//   W = Σᵢ Aᵢ ⊗ Bᵢ,  i = 1..n          Aᵢ: (n, n) the "rule", shared by all layers by default
//   Bᵢ = sᵢ tᵢᵀ                        sᵢ: (in/n, k), tᵢ: (k, out/n), low rank k (factorized)
//   y = x W + b                        W: (in, out), as AdapterHub's PHMLayer multiplies
//
// The adapter's wiring (Houlsby's after attention and the FFN for Compacter, Pfeiffer's after
// the FFN for Compacter++) is the bottleneck plugin's: ../../additive/adapterhub_bn.h.
#include "../../additive/adapterhub_bn.h"

#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <map>

namespace {

using tessera::NamedTensors;
using tessera::Tensor;
using tessera::adapterhub_bn::Preset;

const std::map<std::string, Preset>& compacter_presets() {
  static const std::map<std::string, Preset> p = {
      {"compacter", {false, false, 32, 1.0, "gelu", "bert", "fixed", {"attn", "mlp"}}},    // Houlsby's placement
      {"compacter++", {false, true, 32, 1.0, "gelu", "bert", "fixed", {"mlp"}}},           // Pfeiffer's
  };
  return p;
}

class Compacter final : public tessera::adapterhub_bn::Wiring {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    std::vector<tessera::ParamSpec> keys = {
        {"config", ParamType::String, std::string("compacter"),
         "compacter: PHM adapters after attention and the FFN (Houlsby's placement); compacter++: after the FFN only (Pfeiffer's)", std::nullopt, std::nullopt,
         {"compacter", "compacter++"}},
        {"phm_dim", ParamType::Int, std::int64_t{4}, "n: the number of Kronecker products summed; divides the hidden size and r", 1, std::nullopt, {}},
        {"phm_rank", ParamType::Int, std::int64_t{1}, "k: the rank of each factorized Bᵢ = sᵢ tᵢᵀ", 1, std::nullopt, {}},
        {"factorized_phm_W", ParamType::Bool, true, "Bᵢ as the low-rank product sᵢ tᵢᵀ (true) or a full (in/n, out/n) matrix", std::nullopt, std::nullopt, {}},
        {"shared_W_phm", ParamType::Bool, false, "one set of Bᵢ (per projection direction) shared by every layer", std::nullopt, std::nullopt, {}},
        {"shared_phm_rule", ParamType::Bool, true, "one rule A shared by every projection of every layer (the paper's)", std::nullopt, std::nullopt, {}},
        {"factorized_phm_rule", ParamType::Bool, false, "each Aᵢ as the rank-one product of an (n, 1) and a (1, n) factor", std::nullopt, std::nullopt, {}},
        {"learn_phm", ParamType::Bool, true, "train the rule A (false: it stays at its random start)", std::nullopt, std::nullopt, {}},
        {"phm_c_init", ParamType::String, std::string("normal"), "the rule's start: normal or uniform", std::nullopt, std::nullopt, {"normal", "uniform"}},
        {"phm_init_range", ParamType::Float, 0.0001, "the shared rule's standard deviation when phm_c_init = normal", 0.0, std::nullopt, {}},
        {"hypercomplex_nonlinearity", ParamType::String, std::string("glorot-uniform"),
         "how Bᵢ (or sᵢ, tᵢ) start: glorot-uniform, glorot-normal (per i), or normal with phm_init_range", std::nullopt, std::nullopt,
         {"glorot-uniform", "glorot-normal", "normal"}},
        {"phm_bias", ParamType::Bool, true, "the PHM layers' biases", std::nullopt, std::nullopt, {}},
    };
    for (auto& k : wiring_keys()) keys.push_back(std::move(k));
    for (auto& k : invertible_keys()) keys.push_back(std::move(k));
    return {keys};
  }

 protected:
  const std::map<std::string, Preset>& presets() const override { return compacter_presets(); }
  const char* kind() const override { return "compacter"; }
  bool offers_invertible() const override { return true; }

  void read_projections(const tessera::Params& p, std::int64_t H) override {
    n_ = p.integer("phm_dim");
    k_ = p.integer("phm_rank");
    factorized_W_ = p.flag("factorized_phm_W");
    shared_W_ = p.flag("shared_W_phm");
    shared_rule_ = p.flag("shared_phm_rule");
    factorized_rule_ = p.flag("factorized_phm_rule");
    learn_rule_ = p.flag("learn_phm");
    c_init_ = p.text("phm_c_init");
    w_init_ = p.text("hypercomplex_nonlinearity");
    range_ = p.number("phm_init_range");
    bias_ = p.flag("phm_bias");
    if (H % n_ != 0) throw tessera::ParamError("phm_dim", "phm_dim " + std::to_string(n_) + " does not divide the hidden size " + std::to_string(H));
    if (r_ % n_ != 0)
      throw tessera::ParamError("phm_dim", "phm_dim " + std::to_string(n_) + " does not divide the bottleneck r = " + std::to_string(r_) +
                                               ": choose reduction_factor or bottleneck_size so that it does");
    shared_.clear();
    const auto& opts = model_->info().param_options;
    if (shared_rule_) add_rule(shared_, range_, 1.0);  // AdapterHub's init_shared_parameters: N(0, phm_init_range) or U(±1)
    if (shared_W_)
      for (const auto& [position, in, out] : {std::tuple<const char*, std::int64_t, std::int64_t>{"down", H, r_}, {"up", r_, H}})
        add_W(shared_, std::string("W_") + position + (factorized_W_ ? "_" : ""), in, out, opts);
  }

  // A projection's own tensors: its Bᵢ (unless shared), its rule (unless shared), its bias.
  NamedTensors make(std::int64_t in, std::int64_t out, const std::string&) override {
    NamedTensors p;
    const auto& opts = model_->info().param_options;
    if (!shared_W_) add_W(p, factorized_W_ ? "W_" : "W", in, out, opts);  // W, or W_left and W_right
    if (!shared_rule_) add_rule(p, 0.01, 0.01);  // PHMLayer.reset_parameters: N(0, 0.01) or U(±0.01)
    if (bias_) p["b"] = at::zeros({out}, opts).set_requires_grad(true);
    return p;
  }

  // y = x W + b with W = Σᵢ Aᵢ ⊗ Bᵢ, built once per call: (n, n, n) and (n, in/n, out/n) give
  // W[a·in/n + c, b·out/n + d] = Σᵢ A[i, a, b] B[i, c, d].
  tessera::adapterhub_bn::Projection project(const NamedTensors& own, const std::string& position, c10::ScalarType dtype) const override {
    auto pick = [&](const std::string& local, const std::string& shared_name, bool shared) { return shared ? shared_.at(shared_name) : own.at(local); };
    const std::string W_shared = "W_" + position;
    const Tensor W = factorized_W_ ? Tensor() : pick("W", W_shared, shared_W_);
    const Tensor W_left = factorized_W_ ? pick("W_left", W_shared + "_left", shared_W_) : Tensor();
    const Tensor W_right = factorized_W_ ? pick("W_right", W_shared + "_right", shared_W_) : Tensor();
    const Tensor rule = factorized_rule_ ? Tensor() : pick("phm_rule", "phm_rule", shared_rule_);
    const Tensor rule_left = factorized_rule_ ? pick("phm_rule_left", "phm_rule_left", shared_rule_) : Tensor();
    const Tensor rule_right = factorized_rule_ ? pick("phm_rule_right", "phm_rule_right", shared_rule_) : Tensor();
    const Tensor b = bias_ ? own.at("b") : Tensor();
    return [=](const Tensor& x) {
      const Tensor B = W.defined() ? W.to(dtype) : at::bmm(W_left.to(dtype), W_right.to(dtype));                     // (n, in/n, out/n)
      const Tensor A = rule.defined() ? rule.to(dtype) : at::bmm(rule_left.to(dtype), rule_right.to(dtype));         // (n, n, n)
      const auto n = A.size(0);
      const Tensor full = at::einsum("iab,icd->acbd", {A, B}).reshape({n * B.size(1), n * B.size(2)});              // (in, out)
      const Tensor y = at::matmul(x, full);
      return b.defined() ? y + b.to(dtype) : y;
    };
  }

  NamedTensors shared() const override { return shared_; }

  void projection_config(nlohmann::json& c) const override {
    c.update({{"phm_layer", true}, {"phm_dim", n_}, {"phm_rank", k_}, {"factorized_phm_W", factorized_W_}, {"shared_W_phm", shared_W_},
              {"shared_phm_rule", shared_rule_}, {"factorized_phm_rule", factorized_rule_}, {"learn_phm", learn_rule_}, {"phm_c_init", c_init_},
              {"phm_init_range", range_}, {"hypercomplex_nonlinearity", w_init_}, {"phm_bias", bias_}});
  }

 private:
  // Bᵢ under `name` (full: (n, in/n, out/n)) or its factors `name`left, `name`right
  // ((n, in/n, k), (n, k, out/n)), each slice i drawn on its own as AdapterHub's init_W does.
  void add_W(NamedTensors& into, const std::string& name, std::int64_t in, std::int64_t out, const c10::TensorOptions& opts) const {
    const std::int64_t a = in / n_, d = out / n_;
    auto draw = [&](at::IntArrayRef shape) {
      Tensor t = at::empty(shape, opts);
      at::NoGradGuard no_grad;
      for (std::int64_t i = 0; i < n_; ++i) {
        Tensor s = t[i];  // (rows, cols): xavier's fan_in = cols, fan_out = rows, as torch's for a 2-D tensor
        const double fan_sum = static_cast<double>(s.size(0) + s.size(1));
        if (w_init_ == "glorot-uniform") s.uniform_(-std::sqrt(6.0 / fan_sum), std::sqrt(6.0 / fan_sum));
        else if (w_init_ == "glorot-normal") s.normal_(0.0, std::sqrt(2.0 / fan_sum));
        else s.normal_(0.0, range_);
      }
      return t.set_requires_grad(true);
    };
    if (!factorized_W_) {
      into[name] = draw({n_, a, d});
      return;
    }
    into[name + "left"] = draw({n_, a, k_});
    into[name + "right"] = draw({n_, k_, d});
  }

  // The rule A: phm_rule (n, n, n), or phm_rule_left (n, n, 1) and phm_rule_right (n, 1, n).
  void add_rule(NamedTensors& into, double normal_std, double uniform_bound) const {
    const auto& opts = model_->info().param_options;
    auto draw = [&](at::IntArrayRef shape) {
      Tensor t = at::empty(shape, opts);
      {
        at::NoGradGuard no_grad;
        if (c_init_ == "normal") t.normal_(0.0, normal_std);
        else t.uniform_(-uniform_bound, uniform_bound);
      }
      return t.set_requires_grad(learn_rule_);
    };
    if (factorized_rule_) {
      into["phm_rule_left"] = draw({n_, n_, 1});
      into["phm_rule_right"] = draw({n_, 1, n_});
    } else {
      into["phm_rule"] = draw({n_, n_, n_});
    }
  }

  std::int64_t n_ = 4, k_ = 1;
  bool factorized_W_ = true, shared_W_ = false, shared_rule_ = true, factorized_rule_ = false, learn_rule_ = true, bias_ = true;
  std::string c_init_, w_init_;
  double range_ = 1e-4;
  NamedTensors shared_;
};

}  // namespace

TESSERA_PLUGIN(Compacter, "compacter", "1.0.0", "hybrid",
               "Compacter and Compacter++: bottleneck adapters of parameterized hypercomplex multiplication layers (sums of Kronecker products with a shared rule), in AdapterHub's placements",
               "Karimi Mahabadi et al. 2021, arXiv:2106.04647")
