// What the partial methods share: a dense delta δ on each chosen parameter site, starting at
// 0 — the base never written, value = base + δ — folded in by merge() and taken back by
// unmerge(), saved as the tuned tensors' full values (base + δ) and loaded back as deltas.
// Header-only, SDK-only, like the plugins.
#pragma once

#include <tessera/method.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/StringUtil.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace tessera {

class ParameterDeltas {
 public:
  struct Entry {
    ParameterSite* site;
    at::Tensor delta;   // the base's shape, f32 master, 0 at the start
    at::Tensor folded;  // while merged: what merge() added to the base
  };
  using KeyOf = std::function<std::string(const ParameterSite&)>;

  ParameterDeltas(KeyOf file_key, std::string suffix) : key_(std::move(file_key)), suffix_(std::move(suffix)) {}

  void add(ParameterSite* site, const c10::TensorOptions& param_options) {
    entries_.push_back({site, at::zeros(site->base().sizes(), param_options).set_requires_grad(true), {}});
  }
  bool empty() const { return entries_.empty(); }
  const std::vector<Entry>& entries() const { return entries_; }

  void install(const Owner& owner) {
    for (auto& e : entries_) {
      const at::Tensor d = e.delta;
      const auto dtype = e.site->base().scalar_type();
      e.site->add_delta(owner, [d, dtype] { return d.to(dtype); });
    }
  }

  void merge(const Owner& owner) {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& e : entries_) {
      e.site->remove(owner);
      e.folded = e.delta.detach().to(e.site->base().scalar_type());
      e.site->fold(e.folded);
    }
    merged_ = true;
  }

  void unmerge(const Owner& owner) {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& e : entries_) e.site->fold(-e.folded), e.folded = at::Tensor();
    merged_ = false;
    install(owner);
  }

  NamedTensors trainable() const {
    NamedTensors out;
    for (const auto& e : entries_) out[e.site->name() + suffix_] = e.delta;
    return out;
  }

  // The tuned tensors' values, base + δ, under their file keys.
  NamedTensors values() const {
    at::NoGradGuard no_grad;
    NamedTensors out;
    for (const auto& e : entries_) out[key_(*e.site)] = base_of(e) + e.delta.detach();
    return out;
  }

  // δ = given − base, or an error naming the first foreign, missing or misshapen tensor.
  void load(const NamedTensors& given, const std::string& what) {
    for (const auto& [k, v] : given) {
      bool ours = false;
      for (const auto& e : entries_) ours |= key_(*e.site) == k;
      if (!ours) throw std::runtime_error("tensor '" + k + "' is not one of " + what + ": an adapter of other targets or another model");
    }
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    for (auto& e : entries_) {  // every tensor checked before any delta changes
      const std::string k = key_(*e.site);
      const auto it = given.find(k);
      if (it == given.end()) throw std::runtime_error("adapter lacks tensor '" + k + "'");
      if (it->second.sizes() != e.delta.sizes())
        throw std::runtime_error("tensor '" + k + "' has shape " + c10::str(it->second.sizes()) + ", expected " + c10::str(e.delta.sizes()));
    }
    at::NoGradGuard no_grad;
    for (auto& e : entries_) e.delta.copy_(given.at(key_(*e.site)).to(e.delta.options()) - base_of(e));
  }

 private:
  // The base in f32 on the delta's device (merged: without the fold).
  static at::Tensor base_of(const Entry& e) {
    at::Tensor b = e.site->base().to(e.delta.options());
    return e.folded.defined() ? b - e.folded.to(e.delta.options()) : b;
  }

  KeyOf key_;
  std::string suffix_;
  std::vector<Entry> entries_;
  bool merged_ = false;
};

}  // namespace tessera
