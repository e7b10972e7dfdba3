// DyLoRA: dynamic search-free low-rank adaptation (Valipour, Rezagholizadeh, Kobyzev & Ghodsi,
// EACL 2023, arXiv:2210.07558). The math, every key and where each detail comes from: README.md
// beside this.
//
//   training, each step:  b ~ U{r_min, …, r}, one b for every site of the instance
//                         y = W x + b₀ + (α/b) · B[:, :b] A[:b, :] dropout(x)
//   outside training:     the same at b = eval_rank (default r)
//   A: (r, in), B: (out, r)
//
// Training the truncation at every b sorts the rank-one parts by what they carry, so that any
// b ≤ r serves after training without retraining. train_parts = "last" (the paper's "frozen"
// mode) lets only the b-th row of A and column of B take the step's gradient — the first b − 1
// enter the product as constants — while "all" lets the first b take it.
//
// Unmerged, the update is a parallel branch of the linear site; merging folds
// (α/e)·B[:, :e] A[:e, :] at e = eval_rank into the base weight and removes the branch.
#include <tessera/dropout.h>
#include <tessera/extensions.h>
#include <tessera/low_rank.h>
#include <tessera/plugin.h>
#include <tessera/state.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>

namespace {

using tessera::Tensor;

struct Adapter {
  tessera::LinearSite* site;
  Tensor A;       // (r, in)
  Tensor B;       // (out, r)
  Tensor folded;  // while merged: what merge() added to the base
};

class DyLora final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"r", ParamType::Int, std::int64_t{8}, "the largest rank: A is (r, in), B (out, r)", 1, 65536, {}},
        {"r_min", ParamType::Int, std::int64_t{1}, "the smallest rank a training step draws", 1, 65536, {}},
        {"alpha", ParamType::Float, 8.0, "scale numerator: a rank-b truncation is scaled by alpha / b", 0, std::nullopt, {}},
        {"dropout", ParamType::Float, 0.0, "dropout on the branch input x (training only)", 0, 0.999, {}},
        {"train_parts", ParamType::String, std::string("last"),
         "\"last\": a step at rank b trains only row b of A and column b of B (the paper's frozen mode); \"all\": the first b", std::nullopt,
         std::nullopt, {"last", "all"}},
        {"eval_rank", ParamType::Int, std::int64_t{0}, "the rank used outside training and merged, in [1, r] (0: r)", 0, 65536, {}},
        {"seed", ParamType::Int, std::int64_t{-1}, "seed of the rank draws (-1: drawn from the run's seed at attach)", -1.0, 9.0e15, {}},
        {"init_weights", ParamType::Bool, true, "true: A Kaiming-uniform, B zero (the update starts at 0); false: B Kaiming-uniform too (for tests)",
         std::nullopt, std::nullopt, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    const auto r = p.integer("r"), r_min = p.integer("r_min"), eval_rank = p.integer("eval_rank");
    if (r_min > r) throw tessera::ParamError("r_min", "r_min = " + std::to_string(r_min) + " is above r = " + std::to_string(r));
    if (eval_rank < 0 || eval_rank > r)
      throw tessera::ParamError("eval_rank", "eval_rank = " + std::to_string(eval_rank) + " is outside [1, r = " + std::to_string(r) + "] (0: r)");
  }

  void attach(tessera::AttachContext& ctx) override {
    validate(ctx.params);  // also for an adapter folder read back by the importer
    const auto& p = ctx.params;
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    params_ = p;
    r_ = p.integer("r");
    r_min_ = p.integer("r_min");
    eval_rank_ = p.integer("eval_rank") == 0 ? r_ : p.integer("eval_rank");
    alpha_ = p.number("alpha");
    dropout_ = p.number("dropout");
    last_only_ = p.text("train_parts") == "last";
    auto sites = ctx.model.match_linear(ctx.targets);
    if (sites.empty()) {
      std::string list;
      for (const auto& t : ctx.targets) list += (list.empty() ? "" : ", ") + t;
      throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets [" + list + "]");
    }
    // The ranks come from a generator of this instance's own, so the sequence depends on the
    // seed alone, not on what else draws from torch's default one. It is a CPU generator on
    // every device: a draw is one number the host reads at once, and a device generator would
    // make each step wait for the device.
    auto seed = p.integer("seed");
    if (seed < 0) seed = at::randint(0, std::numeric_limits<std::int32_t>::max(), {1}, at::kLong).item<std::int64_t>();
    seed_ = seed;
    gen_ = at::globalContext().defaultGenerator(c10::Device(c10::kCPU)).clone();
    gen_.set_current_seed(static_cast<std::uint64_t>(seed));
    tessera::log(ctx.model, TESSERA_LOG_INFO, ctx.instance,
                 "DyLoRA draws its training ranks from [" + std::to_string(r_min_) + ", " + std::to_string(r_) + "] with seed " + std::to_string(seed_) +
                     "; outside training, rank " + std::to_string(eval_rank_));

    const auto& opts = ctx.model.info().param_options;  // f32 master weights
    at::NoGradGuard no_grad;
    for (auto* site : sites) {
      const auto in = site->in_features(), out = site->out_features();
      // nn.Linear's default init, kaiming_uniform(a = √5): U(−1/√fan_in, 1/√fan_in), as LoRA's A.
      Tensor A = at::empty({r_, in}, opts).uniform_(-1.0 / std::sqrt(static_cast<double>(in)), 1.0 / std::sqrt(static_cast<double>(in)));
      Tensor B = at::zeros({out, r_}, opts);
      if (!p.flag("init_weights")) B.uniform_(-1.0 / std::sqrt(static_cast<double>(r_)), 1.0 / std::sqrt(static_cast<double>(r_)));
      A.set_requires_grad(true);
      B.set_requires_grad(true);
      adapters_.push_back({site, A, B, {}});
    }
    install();
  }

  // One rank per optimizer step, shared by every site of this instance (the authors' code sets
  // one rank on the whole model before each step).
  void on_step(const tessera::StepInfo&) override { step_rank_ = draw(); }

  bool mergeable() const override { return true; }

  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& a : adapters_) {
      a.site->remove(*owner_);  // the fold replaces the branch; unmerge() installs it again
      const Tensor delta = at::matmul(a.B.narrow(1, 0, eval_rank_), a.A.narrow(0, 0, eval_rank_)) * scaling(eval_rank_);  // (out, in)
      a.folded = delta.to(a.site->weight().base().scalar_type());
      a.site->weight().fold(a.folded);
    }
    merged_ = true;
  }

  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& a : adapters_) a.site->weight().fold(-a.folded), a.folded = Tensor();
    merged_ = false;
    install();
  }

  // An exact resume (tessera.method.resume) needs the rank draws' generator where it stood.
  const void* extension(const char* id) const override { return std::string(id) == TESSERA_EXT_METHOD_RESUME ? &resume_ : nullptr; }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (const auto& a : adapters_) {
      out[a.site->name() + ".lora_A"] = a.A;
      out[a.site->name() + ".lora_B"] = a.B;
    }
    return out;
  }

  // LoRA's file keys (PEFT has no DyLoRA): base_model.model.<module path>.lora_{A,B}.weight,
  // the whole A (r, in) and B (out, r). Their first k rows and columns are a plain LoRA of rank k.
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& a : adapters_) {
      out[key(a, "lora_A")] = a.A;
      out[key(a, "lora_B")] = a.B;
    }
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    tessera::load_exact(state(), tensors, "this DyLoRA", "A is (r, in), B (out, r) at r = " + std::to_string(r_));
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& a : adapters_) targets.push_back(a.site->hf_path());
    // Our own type, with this plugin's keys: the importer maps "DYLORA" back to this plugin.
    return nlohmann::json{{"peft_type", "DYLORA"},
                          {"r", r_},
                          {"r_min", r_min_},
                          {"alpha", alpha_},
                          {"dropout", dropout_},
                          {"train_parts", params_.text("train_parts")},
                          {"eval_rank", eval_rank_},
                          {"seed", seed_},
                          {"target_modules", targets},
                          {"task_type", nullptr},
                          {"inference_mode", true}}
        .dump(2);
  }

 private:
  static std::string key(const Adapter& a, const char* which) { return "base_model.model." + a.site->hf_path() + "." + which + ".weight"; }

  double scaling(std::int64_t b) const { return alpha_ / static_cast<double>(b); }

  std::int64_t draw() { return at::randint(r_min_, r_ + 1, {1}, gen_, at::TensorOptions().dtype(at::kLong)).item<std::int64_t>(); }

  // The rank of this forward: the step's draw in training (drawn here when the caller trains
  // without on_step), eval_rank otherwise.
  std::int64_t rank() {
    if (!model_->training()) return eval_rank_;
    if (step_rank_ == 0) step_rank_ = draw();
    return step_rank_;
  }

  void install() {
    for (auto& a : adapters_) {
      const Adapter* ad = &a;  // adapters_ does not grow after attach
      a.site->add_branch(*owner_, [this, ad](const Tensor& x) {  // x: (..., in) -> (..., out)
        const std::int64_t b = rank();
        const Tensor h = dropout_ > 0 ? tessera::dropout(x, dropout_, model_->training()) : x;
        Tensor A = ad->A.narrow(0, 0, b);  // (b, in)
        Tensor B = ad->B.narrow(1, 0, b);  // (out, b)
        if (last_only_ && model_->training() && b > 1) {
          // The first b − 1 rank-one parts enter as constants: only row b of A and column b of
          // B get this step's gradient. (Under AdamW the others still move by their moments
          // and weight decay, as in the authors' training.)
          A = at::cat({A.narrow(0, 0, b - 1).detach(), A.narrow(0, b - 1, 1)}, 0);
          B = at::cat({B.narrow(1, 0, b - 1).detach(), B.narrow(1, b - 1, 1)}, 1);
        }
        return tessera::low_rank(h, A, B, scaling(b));
      });
    }
  }

  static void save_resume(void* self, tessera::NamedTensors* out) {
    const auto* m = static_cast<DyLora*>(self);
    (*out)["generator"] = m->gen_.get_state();
    (*out)["step_rank"] = at::full({1}, m->step_rank_, at::kLong);
  }
  static void load_resume(void* self, const tessera::NamedTensors* in) {
    auto* m = static_cast<DyLora*>(self);
    m->gen_.set_state(in->at("generator").clone());
    m->step_rank_ = in->at("step_rank").item<std::int64_t>();
  }

  const tessera::Owner* owner_ = nullptr;  // the host's handle for this instance
  tessera::ModelView* model_ = nullptr;
  tessera::Params params_;
  std::vector<Adapter> adapters_;
  at::Generator gen_;
  std::int64_t r_ = 0, r_min_ = 1, eval_rank_ = 0, seed_ = 0;
  std::int64_t step_rank_ = 0;  // this step's rank; 0: none drawn yet
  double alpha_ = 0.0, dropout_ = 0.0;
  bool last_only_ = true, merged_ = false;
  tessera_method_resume_v1 resume_{{sizeof(tessera_method_resume_v1), 1}, this, &save_resume, &load_resume};
};

}  // namespace

TESSERA_PLUGIN(DyLora, "dylora", "1.0.0", "reparameterized",
               "LoRA trained at a rank drawn each step, so that any rank up to r serves after training (DyLoRA)",
               "Valipour, Rezagholizadeh, Kobyzev & Ghodsi 2023, DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic "
               "Search-Free Low-Rank Adaptation, EACL 2023, arXiv:2210.07558")
