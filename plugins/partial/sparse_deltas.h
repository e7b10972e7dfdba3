// What the masked partial methods share (FISH, Child-Tuning's task-driven child network,
// diff pruning after its projection): a fixed set of entries of each chosen base tensor,
// trained as SDK 2.4 sparse deltas — k indices and k values per tensor, so the delta, its
// gradient and AdamW's moments are k numbers — folded in by merge() and taken back by
// unmerge(), saved as `<HF name><suffix>_indices` (k) int64 and `<HF name><suffix>_delta` (k).
// Header-only, SDK-only, like the plugins.
#pragma once

#include <tessera/method.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/StringUtil.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace tessera {

class SparseDeltas {
 public:
  struct Kept {
    ParameterSite* site;
    at::Tensor indices;  // (k) int64 into the flattened base, on the model's device
    at::Tensor values;   // (k) f32 master, requires grad
    at::Tensor folded;   // while merged: what merge() added to the base
  };

  // suffix: ".fish" gives "<HF name>.fish_indices" and "<HF name>.fish_delta".
  explicit SparseDeltas(std::string suffix) : indices_(suffix + "_indices"), delta_(suffix + "_delta") {}

  const std::vector<Kept>& kept() const { return kept_; }
  bool merged() const { return merged_; }
  std::int64_t count() const {
    std::int64_t n = 0;
    for (const auto& k : kept_) n += k.indices.numel();
    return n;
  }

  // Replaces what is installed by `fresh` (sites with their indices and starting values).
  void reset(const Owner& owner, std::vector<Kept> fresh) {
    clear(owner);
    kept_ = std::move(fresh);
    install(owner);
  }
  void clear(const Owner& owner) {
    for (auto& k : kept_) k.site->remove(owner);
    kept_.clear();
  }

  void merge(const Owner& owner) {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& k : kept_) {
      k.site->remove(owner);
      const at::Tensor base = k.site->base();
      k.folded = at::zeros({base.numel()}, base.options()).index_add_(0, k.indices, k.values.detach().to(base.scalar_type())).view(base.sizes());
      k.site->fold(k.folded);
    }
    merged_ = true;
  }

  void unmerge(const Owner& owner) {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& k : kept_) k.site->fold(-k.folded), k.folded = at::Tensor();
    merged_ = false;
    install(owner);
  }

  NamedTensors trainable() const {
    NamedTensors out;
    for (const auto& k : kept_) out[k.site->name() + delta_] = k.values;
    return out;
  }

  NamedTensors state() const {
    NamedTensors out;
    for (const auto& k : kept_) {
      out[k.site->hf_name() + indices_] = k.indices;
      out[k.site->hf_name() + delta_] = k.values;
    }
    return out;
  }

  // Installs a file's entries on `sites` (found by HF name), every tensor checked before
  // anything installed changes: foreign names, a delta without its indices or the reverse,
  // shapes, integer indices in range and distinct.
  void load(const Owner& owner, const NamedTensors& tensors, const std::vector<ParameterSite*>& sites, const c10::TensorOptions& opts, const std::string& method) {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    std::vector<Kept> fresh;
    for (const auto& [key, t] : tensors) {
      if (ends_with(key, indices_)) {
        if (!tensors.count(key.substr(0, key.size() - indices_.size()) + delta_))
          throw std::runtime_error("adapter lacks tensor '" + key.substr(0, key.size() - indices_.size()) + delta_ + "' beside '" + key + "'");
        continue;
      }
      if (!ends_with(key, delta_))
        throw std::runtime_error("tensor '" + key + "' is not part of a " + method + " adapter (<name>" + indices_ + " and <name>" + delta_ + " only)");
      const std::string name = key.substr(0, key.size() - delta_.size());
      const auto idx = tensors.find(name + indices_);
      if (idx == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + name + indices_ + "' beside '" + key + "'");
      ParameterSite* site = nullptr;
      for (auto* s : sites)
        if (s->hf_name() == name) site = s;
      if (site == nullptr) throw std::runtime_error("tensor '" + key + "' names no targeted parameter of this model");
      const at::Tensor& ix = idx->second;
      if (ix.dim() != 1 || t.dim() != 1 || ix.size(0) != t.size(0))
        throw std::runtime_error("tensor '" + key + "' has shape " + c10::str(t.sizes()) + ", its indices " + c10::str(ix.sizes()) + ": one delta per index");
      if (ix.is_floating_point() || ix.is_complex() || ix.scalar_type() == at::kBool)
        throw std::runtime_error("tensor '" + name + indices_ + "' holds " + std::string(c10::toString(ix.scalar_type())) + ", not integer positions");
      const at::Tensor where = ix.to(at::kLong).cpu();
      const auto numel = site->base().numel();
      if (where.numel() > 0 && (where.min().item<std::int64_t>() < 0 || where.max().item<std::int64_t>() >= numel))
        throw std::runtime_error("tensor '" + name + indices_ + "': an index falls outside its " + std::to_string(numel) + " entries");
      if (std::get<0>(at::_unique2(where, false)).numel() != where.numel()) throw std::runtime_error("tensor '" + name + indices_ + "': indices repeat");
      at::NoGradGuard no_grad;
      fresh.push_back({site, where.to(opts.device()), t.to(opts).clone().set_requires_grad(true), {}});
    }
    reset(owner, std::move(fresh));
  }

 private:
  static bool ends_with(const std::string& s, const std::string& end) {
    return s.size() > end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
  }

  void install(const Owner& owner) {
    for (auto& k : kept_) {
      const at::Tensor v = k.values;
      const auto dtype = k.site->base().scalar_type();
      k.site->add_sparse_delta(owner, k.indices, [v, dtype] { return v.to(dtype); });
    }
  }

  std::string indices_, delta_;
  std::vector<Kept> kept_;
  bool merged_ = false;
};

}  // namespace tessera
