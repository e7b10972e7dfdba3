// Child-Tuning (Xu et al. 2021, "Raise a Child in Large Language Model: Towards Effective
// and Generalizable Fine-tuning", arXiv:2109.05687). The math and every key: README.md
// beside this.
//
//   task-free   (CT_F):  g ← g ⊙ B / p,   B ~ Bernoulli(p) per entry, drawn afresh every step
//   task-driven (CT_D):  F = (1/N) Σ_b clip(∂L_b/∂θ)²   over N calibration batches
//                        M = [F ≥ percentile(F, 100 (1 − p))]   one threshold over every target
//                        g ← g ⊙ M                                the child network, fixed
//
// Only the gradient is masked; AdamW then steps as usual (the authors' ChildTuningAdamW). In
// Tessera the base is frozen and the update is a delta on parameter sites: task-free trains a
// dense delta on every targeted tensor (any entry may be drawn on some step) and masks its
// gradient in after_backward(); task-driven's entries outside M never move, so it trains an
// SDK 2.4 sparse delta on M alone — the same AdamW update, at the cost of what trains.
#include "../fisher.h"
#include "../parameter_deltas.h"
#include "../sparse_deltas.h"

#include <tessera/extensions.h>
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

using tessera::Tensor;

// A generator of the device's own kind (CPU: Mersenne Twister; CUDA: Philox), private to the
// method and seeded by it, so its draws do not depend on what else draws from the default one.
at::Generator tessera_seeded_generator(const c10::Device& device, std::uint64_t seed) {
  at::Generator g = at::globalContext().defaultGenerator(device).clone();
  g.set_current_seed(seed);
  return g;
}

// Default targets: the tensors of the transformer layers, as the authors' code takes the
// parameters whose name holds "layer" (BERT's encoder.layer.N.*), in every architecture.
const std::vector<std::string> kLayers = {"re:(encoder\\.|decoder\\.)?layers\\..*"};

// numpy.percentile(values, q) with its default linear method, for the values held by
// `select`: the two order statistics around the virtual index q/100 · (n − 1), interpolated
// as numpy's _lerp does (from the nearer end).
double percentile(const tessera::ScoreSelection& select, double q) {
  const auto n = select.total();
  const double quantile = q / 100.0;
  const double virtual_index = static_cast<double>(n) * quantile + (1.0 + quantile * (1.0 - 1.0 - 1.0)) - 1.0;
  const double below = std::floor(virtual_index);
  const auto j = std::clamp<std::int64_t>(static_cast<std::int64_t>(below), 0, n - 1);
  const double gamma = std::clamp(virtual_index - below, 0.0, 1.0);
  const double a = select.kth_largest(n - j);  // the j-th smallest (0-based)
  const double b = j + 1 < n ? static_cast<double>(select.kth_largest(n - j - 1)) : a;
  const double diff = b - a;
  return gamma >= 0.5 ? b - diff * (1.0 - gamma) : a + diff * gamma;
}

class ChildTuning final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"mode", ParamType::String, std::string("task_driven"),
         "task_driven (CT_D: a fixed child network of highest Fisher information) or task_free (CT_F: a fresh Bernoulli mask each step)", {}, {},
         {"task_driven", "task_free"}},
        {"reserve_p", ParamType::Float, 0.3, "p: the share of entries in the child network (task_driven) or each step's keep probability (task_free)", 1e-9, 1.0, {}},
        {"fisher_batches", ParamType::Int, std::int64_t{1024}, "task_driven: calibration batches in the Fisher estimate (the authors: the whole training set; at most it)",
         1.0, 1e9, {}},
        {"fisher_clip", ParamType::Float, 1.0, "task_driven: each tensor's batch gradient clipped to this norm before squaring, as the authors' code does (0: none)", 0.0,
         1e30, {}},
        {"seed", ParamType::Int, std::int64_t{-1}, "task_free: the masks' generator seed (-1: drawn from the run's seed)", -1.0, 9.0e15, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    if (!(p.number("reserve_p") > 0.0)) throw tessera::ParamError("reserve_p", "reserve_p must be in (0, 1]");
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    driven_ = ctx.params.text("mode") == "task_driven";
    p_ = ctx.params.number("reserve_p");
    batches_ = ctx.params.integer("fisher_batches");
    clip_ = ctx.params.number("fisher_clip");
    opts_ = ctx.model.info().param_options;
    sites_ = ctx.model.match_parameters(ctx.targets.empty() ? kLayers : ctx.targets);
    if (sites_.empty()) throw std::runtime_error("no parameter of this " + ctx.model.info().architecture + " model matches the targets");
    if (driven_) return;  // the child network is chosen in prepare()
    for (auto* s : sites_) dense_.add(s, opts_);
    dense_.install(*owner_);
    // One generator, the tensors in the order of their HF names: the masks depend on the seed
    // alone, and a plain PyTorch loop over sorted names draws the same ones.
    auto seed = ctx.params.integer("seed");
    if (seed < 0) seed = at::randint(0, std::numeric_limits<std::int32_t>::max(), {1}, at::kLong).item<std::int64_t>();
    seed_ = seed;
    gen_ = tessera_seeded_generator(opts_.device(), static_cast<std::uint64_t>(seed));
    order_.resize(sites_.size());
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    std::sort(order_.begin(), order_.end(), [&](std::size_t a, std::size_t b) { return sites_[a]->hf_name() < sites_[b]->hf_name(); });
  }

  // Task-driven: the Fisher information of every targeted entry from whole calibration
  // batches, each tensor's gradient clipped before squaring, then one percentile threshold.
  void prepare(const tessera::Calibration& c) override {
    if (!driven_) return;
    if (sparse_.merged()) throw std::runtime_error("prepare() while merged: unmerge first");
    const auto n = std::min(batches_, c.batches);
    if (n <= 0) throw std::runtime_error("task-driven Child-Tuning needs training batches to estimate the Fisher information, and the host offers none");
    used_ = n;
    sparse_.clear(*owner_);
    std::vector<Tensor> fisher;
    for (auto* s : sites_) fisher.push_back(at::zeros(s->base().sizes(), opts_));
    const double inv_n = 1.0 / static_cast<double>(n);
    tessera::probe_gradients(sites_, *owner_, opts_, n, c.loss, [&](std::size_t i, const Tensor& g) {
      Tensor clipped = g;
      if (clip_ > 0) clipped = g * (clip_ / (g.norm() + 1e-6)).clamp_max(1.0);  // torch's clip_grad_norm_ on the one tensor
      fisher[i].add_(clipped.square().mul_(inv_n));
    });
    tessera::ScoreSelection select(fisher);
    // As the authors compare the tensors with numpy's float64 percentile: in the scores' dtype.
    const auto threshold = static_cast<float>(percentile(select, (1.0 - p_) * 100.0));
    const auto idx = select.at_or_above(threshold);
    std::vector<tessera::SparseDeltas::Kept> fresh;
    for (std::size_t i = 0; i < sites_.size(); ++i)
      if (idx[i].numel() > 0) fresh.push_back({sites_[i], idx[i], at::zeros({idx[i].numel()}, opts_).set_requires_grad(true), {}});
    sparse_.reset(*owner_, std::move(fresh));
  }

  // Task-free: each entry's gradient kept with probability p and scaled by 1/p. The draws are
  // uniform in [0, 1) (kept below p) from the method's own generator on the model's device
  // (on the CPU, torch's Mersenne Twister: a plain PyTorch loop with the seed draws the same).
  void after_backward() override {
    if (driven_) return;
    const auto& entries = dense_.entries();
    for (const auto i : order_) {
      const Tensor& d = entries[i].delta;
      if (!d.grad().defined()) continue;
      const Tensor u = at::rand(d.sizes(), gen_, d.options());
      d.mutable_grad().mul_(u.lt(p_).to(d.scalar_type()).div_(p_));
    }
  }

  bool mergeable() const override { return true; }
  void merge() override { driven_ ? sparse_.merge(*owner_) : dense_.merge(*owner_); }
  void unmerge() override { driven_ ? sparse_.unmerge(*owner_) : dense_.unmerge(*owner_); }

  tessera::NamedTensors trainable() override { return driven_ ? sparse_.trainable() : dense_.trainable(); }
  // An exact resume (tessera.method.resume) needs task-free's mask generator where it stood;
  // task-driven's mask comes again from prepare().
  const void* extension(const char* id) const override { return std::string(id) == TESSERA_EXT_METHOD_RESUME && !driven_ ? &resume_ : nullptr; }
  // task_driven: `<HF name>.child_indices` and `.child_delta`; task_free: the tuned tensors'
  // full values under their HF names (a dense fine-tune of the targets).
  tessera::NamedTensors state() override { return driven_ ? sparse_.state() : dense_.values(); }
  void load_state(const tessera::NamedTensors& tensors) override {
    if (driven_) sparse_.load(*owner_, tensors, sites_, opts_, "task-driven Child-Tuning");
    else dense_.load(tensors, "this Child-Tuning's targets");
  }

  std::string adapter_config_json() const override {
    nlohmann::json t = {{"mode", driven_ ? "task_driven" : "task_free"}, {"reserve_p", p_}};
    if (driven_) t["fisher_batches"] = used_, t["fisher_clip"] = clip_, t["kept"] = sparse_.count();
    else t["seed"] = seed_;
    return nlohmann::json{{"peft_type", "CHILD_TUNING"}, {"tessera", t}}.dump(2);
  }

 private:
  static std::string hf_key(const tessera::ParameterSite& s) { return s.hf_name(); }
  static void save_resume(void* self, tessera::NamedTensors* out) { (*out)["generator"] = static_cast<ChildTuning*>(self)->gen_.get_state(); }
  static void load_resume(void* self, const tessera::NamedTensors* in) { static_cast<ChildTuning*>(self)->gen_.set_state(in->at("generator").clone()); }

  const tessera::Owner* owner_ = nullptr;
  bool driven_ = true;
  double p_ = 0.3, clip_ = 1.0;
  std::int64_t batches_ = 1024, used_ = 0, seed_ = 0;
  c10::TensorOptions opts_;
  std::vector<tessera::ParameterSite*> sites_;
  std::vector<std::size_t> order_;
  at::Generator gen_;
  tessera::ParameterDeltas dense_{hf_key, ".child_delta"};
  tessera::SparseDeltas sparse_{".child"};
  tessera_method_resume_v1 resume_{{sizeof(tessera_method_resume_v1), 1}, this, &save_resume, &load_resume};
};

}  // namespace

TESSERA_PLUGIN(ChildTuning, "child_tuning", "1.0.0", "partial",
               "A child network of the base trained by masking its gradients: fixed by Fisher information (task-driven) or drawn each step (task-free)",
               "Xu et al. 2021, Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning, arXiv:2109.05687")
