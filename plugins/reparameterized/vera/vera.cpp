// VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort & Asano 2024, arXiv:2310.11454),
// as PEFT has it. The math and every key: README.md beside this.
//
//   y = W x + b + λ_b ⊙ B_s (λ_d ⊙ A_s dropout(x))     λ_d: (r), λ_b: (out), trained
//   A: (r, max_in), B: (max_out, r) frozen, shared by every targeted layer and drawn from one
//   seed (projection_prng_key); A_s = A[:, :in], B_s = B[:out, :]
//
// A and B are PEFT's own draws: torch's CPU Mersenne Twister seeded with the key, A then B,
// each U(−√(6/fan_in), √(6/fan_in)) — so an adapter file needs only the vectors, and one that
// carries the matrices is checked against them.
#include <tessera/dropout.h>
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <tuple>

namespace {

using tessera::Tensor;

struct Vec {
  tessera::LinearSite* site;
  Tensor lambda_d;  // (r)
  Tensor lambda_b;  // (out)
  Tensor folded;    // while merged
};

class Vera final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"r", ParamType::Int, std::int64_t{256}, "rank of the shared random matrices", 1, 65536, {}},
        {"projection_prng_key", ParamType::Int, std::int64_t{0}, "seed of the shared random A and B (PEFT's key gives PEFT's matrices)", 0, 9.0e15, {}},
        {"save_projection", ParamType::Bool, true, "write A and B into the adapter file too (checked against the key when loaded)", {}, {}, {}},
        {"vera_dropout", ParamType::Float, 0.0, "dropout on the branch input (training only)", 0, 0.999, {}},
        {"d_initial", ParamType::Float, 0.1, "λ_d's starting value", std::nullopt, std::nullopt, {}},
        {"init_weights", ParamType::Bool, true, "true: λ_d = d_initial, λ_b = 0 (the update starts at 0); false: λ_d ~ N(0, 1), λ_b = 1", {}, {}, {}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    params_ = ctx.params;
    dropout_ = ctx.params.number("vera_dropout");
    auto sites = ctx.model.match_linear(ctx.targets);
    if (sites.empty()) throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets");
    const auto r = ctx.params.integer("r");
    std::int64_t max_in = 0, max_out = 0;
    for (auto* s : sites) max_in = std::max(max_in, s->in_features()), max_out = std::max(max_out, s->out_features());
    const auto& opts = ctx.model.info().param_options;
    at::NoGradGuard no_grad;
    std::tie(A_, B_) = projections(ctx.params.integer("projection_prng_key"), r, max_in, max_out);
    A_ = A_.to(opts), B_ = B_.to(opts);
    const bool init = ctx.params.flag("init_weights");
    for (auto* s : sites) {
      Tensor d = init ? at::full({r}, ctx.params.number("d_initial"), opts) : at::randn({r}, opts);
      Tensor b = init ? at::zeros({s->out_features()}, opts) : at::ones({s->out_features()}, opts);
      vecs_.push_back({s, d.set_requires_grad(true), b.set_requires_grad(true), {}});
    }
    install();
  }

  bool mergeable() const override { return true; }
  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& v : vecs_) {
      v.site->remove(*owner_);
      v.folded = delta(v).to(v.site->weight().base().scalar_type());
      v.site->weight().fold(v.folded);
    }
    merged_ = true;
  }
  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& v : vecs_) v.site->weight().fold(-v.folded), v.folded = Tensor();
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (const auto& v : vecs_) out[v.site->name() + ".vera_lambda_d"] = v.lambda_d, out[v.site->name() + ".vera_lambda_b"] = v.lambda_b;
    return out;
  }

  // PEFT's keys: base_model.model.<module>.vera_lambda_{b,d}; with save_projection,
  // base_model.vera_A and base_model.vera_B.
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& v : vecs_) out[key(v, "vera_lambda_d")] = v.lambda_d, out[key(v, "vera_lambda_b")] = v.lambda_b;
    if (params_.flag("save_projection")) out["base_model.vera_A"] = A_, out["base_model.vera_B"] = B_;
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    for (const char* k : {"base_model.vera_A", "base_model.vera_B"}) {
      const auto it = tensors.find(k);
      if (it == tensors.end()) continue;
      const Tensor& ours = std::string(k) == "base_model.vera_A" ? A_ : B_;
      if (it->second.sizes() != ours.sizes() || !at::allclose(it->second.to(ours.options()), ours))
        throw std::runtime_error("tensor '" + std::string(k) + "' (shape " + c10::str(it->second.sizes()) + ") is not what projection_prng_key = " +
                                 std::to_string(params_.integer("projection_prng_key")) + " and r = " + std::to_string(params_.integer("r")) +
                                 " give (" + c10::str(ours.sizes()) + "): the adapter was made with another key, rank or targets");
    }
    for (int pass = 0; pass < 2; ++pass)
      for (auto& v : vecs_)
        for (auto [name, t] : {std::pair<const char*, Tensor*>{"vera_lambda_d", &v.lambda_d}, {"vera_lambda_b", &v.lambda_b}}) {
          const auto it = tensors.find(key(v, name));
          if (it == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + key(v, name) + "'");
          if (it->second.sizes() != t->sizes())
            throw std::runtime_error("tensor '" + key(v, name) + "' has shape " + c10::str(it->second.sizes()) + ", expected " + c10::str(t->sizes()));
          if (pass == 1) {
            at::NoGradGuard no_grad;
            t->copy_(it->second);
          }
        }
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& v : vecs_) targets.push_back(v.site->hf_path());
    return nlohmann::json{{"peft_type", "VERA"},
                          {"r", params_.integer("r")},
                          {"target_modules", targets},
                          {"projection_prng_key", params_.integer("projection_prng_key")},
                          {"save_projection", params_.flag("save_projection")},
                          {"vera_dropout", params_.number("vera_dropout")},
                          {"d_initial", params_.number("d_initial")},
                          {"init_weights", params_.flag("init_weights")},
                          {"fan_in_fan_out", false},
                          {"bias", "none"},
                          {"task_type", nullptr},
                          {"inference_mode", true}}
        .dump(2);
  }

 private:
  // PEFT's _kaiming_init with one CPU generator: A (r, max_in) then B (max_out, r), each
  // U(−√(6/fan_in), √(6/fan_in)), fan_in = size(1).
  static std::pair<Tensor, Tensor> projections(std::int64_t seed, std::int64_t r, std::int64_t max_in, std::int64_t max_out) {
    at::Generator gen = at::globalContext().defaultGenerator(c10::Device(c10::kCPU)).clone();
    gen.set_current_seed(static_cast<std::uint64_t>(seed));
    auto draw = [&](std::int64_t rows, std::int64_t cols) {
      const double bound = std::sqrt(3.0) * std::sqrt(2.0) / std::sqrt(static_cast<double>(cols));
      return at::empty({rows, cols}, at::kFloat).uniform_(-bound, bound, gen);
    };
    Tensor A = draw(r, max_in);
    Tensor B = draw(max_out, r);
    return {A, B};
  }
  static std::string key(const Vec& v, const char* name) { return "base_model.model." + v.site->hf_path() + "." + name; }

  // λ_b ⊙ B_s diag(λ_d) A_s: (out, in)
  Tensor delta(const Vec& v) const {
    const Tensor As = A_.narrow(1, 0, v.site->in_features()), Bs = B_.narrow(0, 0, v.site->out_features());
    return v.lambda_b.unsqueeze(1) * at::matmul(Bs, v.lambda_d.unsqueeze(1) * As);
  }

  void install() {
    for (auto& v : vecs_) {
      const Vec* vp = &v;  // vecs_ does not grow after attach
      v.site->add_branch(*owner_, [this, vp](const Tensor& x) {  // (..., in) -> (..., out)
        const auto dt = x.scalar_type();
        const Tensor h = dropout_ > 0 ? tessera::dropout(x, dropout_, model_->training()) : x;
        const Tensor As = A_.narrow(1, 0, vp->site->in_features()).to(dt), Bs = B_.narrow(0, 0, vp->site->out_features()).to(dt);
        return vp->lambda_b.to(dt) * at::linear(vp->lambda_d.to(dt) * at::linear(h, As), Bs);
      });
    }
  }

  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  tessera::Params params_;
  double dropout_ = 0.0;
  Tensor A_, B_;  // shared, frozen, f32 on the model's device
  std::vector<Vec> vecs_;
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(Vera, "vera", "1.0.0", "reparameterized",
               "Trained scaling vectors around frozen random low-rank matrices shared by every layer (VeRA)",
               "Kopiczko, Blankevoort & Asano 2024, VeRA: Vector-based Random Matrix Adaptation, arXiv:2310.11454")
