// FISH mask (Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks",
// arXiv:2111.09839). The math and every key: README.md beside this.
//
//   F̂_θ = Σ_i (∂L_i/∂θ)²                    empirical Fisher, over N training examples one by one
//   M   = top-k of F̂ over every targeted entry of the base, k = ⌈keep_ratio · total⌉
//   θ'  = θ + scatter(M, δ)                    δ: (k) trained, 0 at the start
//
// The mask is chosen once in prepare(), before the optimizer exists, from the host's
// calibration examples (the task's own loss with its true labels, dropout off, as the
// authors' code computes it); from then on only the k masked
// entries train — as an SDK 2.4 sparse delta, so the delta, its gradient and the optimizer's
// moments are k numbers, not the weights' size. Files: per tensor its kept indices and their
// deltas; merge() scatters them into the base.
#include <tessera/plugin.h>

#include "../fisher.h"
#include "../sparse_deltas.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>

namespace {

using tessera::Tensor;

class FishMask final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"keep_ratio", ParamType::Float, 0.005, "the share of the targeted entries kept (0.5% in the paper)", 1e-9, 1.0, {}},
        {"num_samples", ParamType::Int, std::int64_t{1024}, "training examples whose squared gradients estimate the Fisher (the paper's 1024; at most the training set)",
         1.0, 1e9, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    if (!(p.number("keep_ratio") > 0.0)) throw tessera::ParamError("keep_ratio", "keep_ratio must be in (0, 1]");
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    keep_ratio_ = ctx.params.number("keep_ratio");
    samples_ = ctx.params.integer("num_samples");
    opts_ = ctx.model.info().param_options;
    sites_ = ctx.targets.empty() ? ctx.model.parameter_sites() : ctx.model.match_parameters(ctx.targets);
    if (sites_.empty()) throw std::runtime_error("no parameter of this " + ctx.model.info().architecture + " model matches the targets");
  }

  // The empirical Fisher of every targeted entry, then the global top-k as the mask.
  // Per example when the host offers it (SDK 2.4); otherwise per calibration batch.
  void prepare(const tessera::Calibration& c) override {
    if (kept_.merged()) throw std::runtime_error("prepare() while merged: unmerge first");
    const bool per_example = c.examples > 0 && c.example_loss;
    const auto n = std::min(samples_, per_example ? c.examples : c.batches);
    if (n <= 0) throw std::runtime_error("FISH needs training examples to estimate the Fisher information, and the host offers none");
    used_ = n;
    kept_.clear(*owner_);  // a second prepare() chooses afresh
    // F̂ is the one model-sized copy prepare() holds, freed tensor by tensor as the mask is chosen.
    std::vector<Tensor> fisher;
    for (auto* s : sites_) fisher.push_back(at::zeros(s->base().sizes(), opts_));
    tessera::probe_gradients(sites_, *owner_, opts_, n, per_example ? c.example_loss : c.loss,
                             [&](std::size_t i, const Tensor& g) { fisher[i].add_(g.square()); });
    tessera::ScoreSelection select(fisher);
    const auto k = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(keep_ratio_ * static_cast<double>(select.total()) - 1e-9)));
    const auto idx = select.top_k(k);
    std::vector<tessera::SparseDeltas::Kept> fresh;
    for (std::size_t i = 0; i < sites_.size(); ++i)
      if (idx[i].numel() > 0) fresh.push_back({sites_[i], idx[i], at::zeros({idx[i].numel()}, opts_).set_requires_grad(true), {}});
    kept_.reset(*owner_, std::move(fresh));
  }

  bool mergeable() const override { return true; }
  void merge() override { kept_.merge(*owner_); }
  void unmerge() override { kept_.unmerge(*owner_); }

  tessera::NamedTensors trainable() override { return kept_.trainable(); }

  // Per tensor with kept entries: `<HF name>.fish_indices` (k) int64 and `.fish_delta` (k).
  tessera::NamedTensors state() override { return kept_.state(); }

  // Installs the file's mask and deltas (a fresh instance needs no prepare() for that).
  void load_state(const tessera::NamedTensors& tensors) override { kept_.load(*owner_, tensors, sites_, opts_, "FISH"); }

  std::string adapter_config_json() const override {
    return nlohmann::json{{"peft_type", "FISH_MASK"}, {"tessera", {{"keep_ratio", keep_ratio_}, {"num_samples", used_}, {"kept", kept_.count()}}}}.dump(2);
  }

 private:
  const tessera::Owner* owner_ = nullptr;
  double keep_ratio_ = 0.005;
  std::int64_t samples_ = 1024, used_ = 0;
  c10::TensorOptions opts_;
  std::vector<tessera::ParameterSite*> sites_;
  tessera::SparseDeltas kept_{".fish"};
};

}  // namespace

TESSERA_PLUGIN(FishMask, "fish_mask", "1.0.0", "partial",
               "The base's entries of highest empirical Fisher information, a fixed sparse mask, trained as a sparse delta (FISH mask)",
               "Sung, Nair & Raffel 2021, Training Neural Networks with Fixed Sparse Masks, arXiv:2111.09839")
