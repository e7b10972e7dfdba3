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

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <limits>

namespace {

using tessera::Tensor;

struct Kept {
  tessera::ParameterSite* site;
  Tensor indices;  // (k_i) int64 into the flattened base
  Tensor values;   // (k_i) f32 master
  Tensor folded;   // while merged
};

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
    if (merged_) throw std::runtime_error("prepare() while merged: unmerge first");
    const bool per_example = c.examples > 0 && c.example_loss;
    const auto n = std::min(samples_, per_example ? c.examples : c.batches);
    if (n <= 0) throw std::runtime_error("FISH needs training examples to estimate the Fisher information, and the host offers none");
    used_ = n;
    for (auto& k : kept_) k.site->remove(*owner_);  // a second prepare() chooses afresh
    kept_.clear();
    // The probe: a zero scalar broadcast to each tensor's shape, added as a delta. The gradient
    // reaching the broadcast is ∂L/∂θ in full; a hook squares it into F̂ on its way, so no
    // tensor-sized probe or gradient is kept (F̂ is the one extra copy of the model). A tensor
    // read more than once in a forward (a tied embedding and LM head) gets one hook call per
    // read: its parts are summed into a buffer first and squared after the backward pass.
    struct Probe {
      std::vector<Tensor> fisher, parts;
      std::vector<int> reads;
    };
    auto st = std::make_shared<Probe>();
    const Tensor zero = at::zeros({}, opts_).set_requires_grad(true);
    for (std::size_t i = 0; i < sites_.size(); ++i) {
      auto* s = sites_[i];
      st->fisher.push_back(at::zeros(s->base().sizes(), opts_));
      st->parts.emplace_back();
      st->reads.push_back(0);
      const auto shape = s->base().sizes().vec();
      const auto dtype = s->base().scalar_type();
      s->add_delta(*owner_, [zero, st, i, shape, dtype] {
        ++st->reads[i];
        Tensor e = zero.to(dtype).expand(shape);
        e.register_hook([st, i](const Tensor& g) {
          at::NoGradGuard no_grad;
          const Tensor g32 = g.to(st->fisher[i].scalar_type());
          if (st->reads[i] <= 1) st->fisher[i].add_(g32.square());
          else st->parts[i] = st->parts[i].defined() ? st->parts[i] + g32 : g32.clone();
        });
        return e;
      });
    }
    {
      struct Remove {  // the probes go however this block ends (before the mask is installed)
        const std::vector<tessera::ParameterSite*>& sites;
        const tessera::Owner& owner;
        ~Remove() {
          for (auto* s : sites) s->remove(owner);
        }
      } remove{sites_, *owner_};
      for (std::int64_t b = 0; b < n; ++b) {
        (per_example ? c.example_loss(b) : c.loss(b)).backward();
        at::NoGradGuard no_grad;
        for (std::size_t i = 0; i < sites_.size(); ++i) {
          if (st->parts[i].defined()) st->fisher[i].add_(st->parts[i].square()), st->parts[i] = Tensor();
          st->reads[i] = 0;
        }
      }
    }
    for (auto& f : st->fisher)
      if (!at::isfinite(f).all().item<bool>()) throw std::runtime_error("the Fisher estimate is not finite (a calibration loss overflowed): no mask chosen");
    choose(st->fisher);
  }

  bool mergeable() const override { return true; }

  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& k : kept_) {
      k.site->remove(*owner_);
      const Tensor base = k.site->base();
      k.folded = at::zeros({base.numel()}, base.options()).index_add_(0, k.indices, k.values.detach().to(base.scalar_type())).view(base.sizes());
      k.site->fold(k.folded);
    }
    merged_ = true;
  }

  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& k : kept_) k.site->fold(-k.folded), k.folded = Tensor();
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (const auto& k : kept_) out[k.site->name() + ".fish_delta"] = k.values;
    return out;
  }

  // Per tensor with kept entries: `<HF name>.fish_indices` (k) int64 and `.fish_delta` (k).
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& k : kept_) {
      out[k.site->hf_name() + ".fish_indices"] = k.indices;
      out[k.site->hf_name() + ".fish_delta"] = k.values;
    }
    return out;
  }

  // Installs the file's mask and deltas (a fresh instance needs no prepare() for that).
  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    std::vector<Kept> fresh;  // checked in full before anything installed changes
    for (const auto& [key, t] : tensors) {
      const std::string suffix = ".fish_indices";
      if (key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0) continue;
      const std::string dsuffix = ".fish_delta";
      if (key.size() <= dsuffix.size() || key.compare(key.size() - dsuffix.size(), dsuffix.size(), dsuffix) != 0)
        throw std::runtime_error("tensor '" + key + "' is not part of a FISH adapter (<name>.fish_indices and <name>.fish_delta only)");
      const std::string name = key.substr(0, key.size() - dsuffix.size());
      const auto idx = tensors.find(name + suffix);
      if (idx == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + name + suffix + "' beside '" + key + "'");
      tessera::ParameterSite* site = nullptr;
      for (auto* s : sites_)
        if (s->hf_name() == name) site = s;
      if (site == nullptr) throw std::runtime_error("tensor '" + key + "' names no targeted parameter of this model");
      const Tensor& ix = idx->second;
      if (ix.dim() != 1 || t.dim() != 1 || ix.size(0) != t.size(0))
        throw std::runtime_error("tensor '" + key + "' has shape " + c10::str(t.sizes()) + ", its indices " + c10::str(ix.sizes()) + ": one delta per index");
      if (ix.is_floating_point() || ix.is_complex() || ix.scalar_type() == at::kBool)
        throw std::runtime_error("tensor '" + name + suffix + "' holds " + std::string(c10::toString(ix.scalar_type())) + ", not integer positions");
      const Tensor where = ix.to(at::kLong).cpu();
      const auto numel = site->base().numel();
      if (where.numel() > 0 && (where.min().item<std::int64_t>() < 0 || where.max().item<std::int64_t>() >= numel))
        throw std::runtime_error("tensor '" + name + suffix + "': an index falls outside its " + std::to_string(numel) + " entries");
      if (std::get<0>(at::_unique2(where, false)).numel() != where.numel()) throw std::runtime_error("tensor '" + name + suffix + "': indices repeat");
      at::NoGradGuard no_grad;
      fresh.push_back({site, where.to(opts_.device()), t.to(opts_).clone().set_requires_grad(true), {}});
    }
    for (auto& [key, t] : tensors)
      if (key.size() > 13 && key.compare(key.size() - 13, 13, ".fish_indices") == 0 && !tensors.count(key.substr(0, key.size() - 13) + ".fish_delta"))
        throw std::runtime_error("adapter lacks tensor '" + key.substr(0, key.size() - 13) + ".fish_delta' beside '" + key + "'");
    for (auto& k : kept_) k.site->remove(*owner_);
    kept_ = std::move(fresh);
    install();
  }

  std::string adapter_config_json() const override {
    std::int64_t total = 0;
    for (const auto& k : kept_) total += k.indices.numel();
    return nlohmann::json{{"peft_type", "FISH_MASK"}, {"tessera", {{"keep_ratio", keep_ratio_}, {"num_samples", used_}, {"kept", total}}}}.dump(2);
  }

 private:
  // The global top-k without concatenating the scores (one more model-sized copy): the k-th
  // largest value by bisection on counts, then every entry above it and, of those equal to
  // it, the first ones in tensor order, k in all.
  void choose(std::vector<Tensor>& fisher) {
    std::int64_t total = 0;
    double hi = 0;
    for (const auto& f : fisher) total += f.numel(), hi = std::max(hi, f.max().item<double>());
    const auto k = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(keep_ratio_ * static_cast<double>(total) - 1e-9)));
    if (hi <= 0.0) throw std::runtime_error("the loss reaches none of the targeted entries (their Fisher information is 0): no mask to choose");
    auto at_least = [&](float t) {
      std::int64_t n = 0;
      for (const auto& f : fisher) n += f.ge(t).sum().item<std::int64_t>();
      return n;
    };
    // Invariant: at_least(lo) >= k > at_least(up). Bisection over the bits of non-negative
    // float32s, which order as the values do: at most 32 passes.
    auto as_float = [](std::uint32_t b) {
      float f;
      std::memcpy(&f, &b, sizeof f);
      return f;
    };
    const float top = std::nextafter(static_cast<float>(hi), std::numeric_limits<float>::infinity());
    std::uint32_t lo_bits = 0, up_bits;
    std::memcpy(&up_bits, &top, sizeof up_bits);
    while (up_bits - lo_bits > 1) {
      const std::uint32_t mid = lo_bits + (up_bits - lo_bits) / 2;
      (at_least(as_float(mid)) >= k ? lo_bits : up_bits) = mid;
    }
    const float lo = as_float(lo_bits), up = as_float(up_bits);
    std::int64_t ties = k - at_least(up);  // entries equal to lo still to take
    for (std::size_t i = 0; i < sites_.size(); ++i) {
      const Tensor flat = fisher[i].reshape({-1});
      Tensor idx = flat.ge(up).nonzero().reshape({-1});
      if (ties > 0) {
        const Tensor eq = flat.eq(lo).nonzero().reshape({-1});
        const auto take = std::min<std::int64_t>(ties, eq.numel());
        idx = std::get<0>(at::sort(at::cat({idx, eq.narrow(0, 0, take)})));
        ties -= take;
      }
      fisher[i] = Tensor();  // free as we go
      if (idx.numel() == 0) continue;
      kept_.push_back({sites_[i], idx, at::zeros({idx.numel()}, opts_).set_requires_grad(true), {}});
    }
    install();
  }

  void install() {
    for (auto& k : kept_) {
      const Tensor v = k.values;
      const auto dtype = k.site->base().scalar_type();
      k.site->add_sparse_delta(*owner_, k.indices, [v, dtype] { return v.to(dtype); });
    }
  }

  const tessera::Owner* owner_ = nullptr;
  double keep_ratio_ = 0.005;
  std::int64_t samples_ = 1024, used_ = 0;
  c10::TensorOptions opts_;
  std::vector<tessera::ParameterSite*> sites_;
  std::vector<Kept> kept_;
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(FishMask, "fish_mask", "1.0.0", "partial",
               "The base's entries of highest empirical Fisher information, a fixed sparse mask, trained as a sparse delta (FISH mask)",
               "Sung, Nair & Raffel 2021, Training Neural Networks with Fixed Sparse Masks, arXiv:2111.09839")
