// What the Fisher-chosen partial methods share (FISH, Child-Tuning's task-driven child
// network): every targeted base tensor's full gradient over calibration passes, without a
// trainable copy of the model, and global selections over per-entry scores without
// concatenating them. Header-only, SDK-only, like the plugins.
#pragma once

#include <tessera/method.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

namespace tessera {

// Runs loss(b).backward() for b < n and hands visit(i, g) the full gradient g of targeted
// tensor i (the base's shape, `opts`' dtype) after each pass. The probe is a zero scalar
// broadcast to each tensor's shape, added as a delta: the gradient reaching the broadcast is
// ∂L/∂θ in full, and a hook passes it on, so no tensor-sized probe or gradient is kept. A
// tensor read more than once in a forward (a tied embedding and LM head) gets one hook call
// per read: its parts are summed first and visited after the backward pass, as PyTorch's one
// parameter would sum them. The probes go however this ends.
inline void probe_gradients(const std::vector<ParameterSite*>& sites, const Owner& owner, const c10::TensorOptions& opts, std::int64_t n,
                            const std::function<Tensor(std::int64_t)>& loss, const std::function<void(std::size_t, const Tensor&)>& visit) {
  struct Probe {
    std::vector<Tensor> parts;
    std::vector<int> reads;
    std::function<void(std::size_t, const Tensor&)> visit;
    c10::ScalarType dtype;
  };
  auto st = std::make_shared<Probe>(Probe{std::vector<Tensor>(sites.size()), std::vector<int>(sites.size(), 0), visit, opts.dtype().toScalarType()});
  struct Remove {
    const std::vector<ParameterSite*>& sites;
    const Owner& owner;
    ~Remove() {
      for (auto* s : sites) s->remove(owner);
    }
  } remove{sites, owner};
  const Tensor zero = at::zeros({}, opts).set_requires_grad(true);
  for (std::size_t i = 0; i < sites.size(); ++i) {
    const auto shape = sites[i]->base().sizes().vec();
    const auto dtype = sites[i]->base().scalar_type();
    sites[i]->add_delta(owner, [zero, st, i, shape, dtype] {
      ++st->reads[i];
      Tensor e = zero.to(dtype).expand(shape);
      e.register_hook([st, i](const Tensor& g) {
        at::NoGradGuard no_grad;
        const Tensor g32 = g.to(st->dtype);
        if (st->reads[i] <= 1) st->visit(i, g32);
        else st->parts[i] = st->parts[i].defined() ? st->parts[i] + g32 : g32.clone();
      });
      return e;
    });
  }
  for (std::int64_t b = 0; b < n; ++b) {
    loss(b).backward();
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < sites.size(); ++i) {
      if (st->parts[i].defined()) st->visit(i, st->parts[i]), st->parts[i] = Tensor();
      st->reads[i] = 0;
    }
  }
}

// Global selections over non-negative per-entry scores held tensor by tensor.
class ScoreSelection {
 public:
  // fisher: the scores are a Fisher estimate, refused when not finite or all zero (any other
  // scores may be zero: ties then choose).
  explicit ScoreSelection(std::vector<Tensor>& scores, bool fisher = true) : s_(scores) {
    for (const auto& f : s_) {
      total_ += f.numel();
      if (fisher && !at::isfinite(f).all().item<bool>()) throw std::runtime_error("the Fisher estimate is not finite (a calibration loss overflowed): no mask chosen");
      hi_ = std::max(hi_, f.max().item<double>());
    }
    if (fisher && hi_ <= 0.0) throw std::runtime_error("the loss reaches none of the targeted entries (their Fisher information is 0): no mask to choose");
  }
  std::int64_t total() const { return total_; }

  std::int64_t at_least(float t) const {
    std::int64_t n = 0;
    for (const auto& f : s_) n += f.ge(t).sum().item<std::int64_t>();
    return n;
  }

  // The k-th largest score (1 ≤ k ≤ total): the largest t with at_least(t) ≥ k, an entry's
  // value. Bisection over the bits of non-negative float32s, which order as the values do:
  // at most 32 counting passes, no sorted copy.
  float kth_largest(std::int64_t k) const {
    const float top = std::nextafter(static_cast<float>(hi_), std::numeric_limits<float>::infinity());
    std::uint32_t lo = 0, up;
    std::memcpy(&up, &top, sizeof up);
    while (up - lo > 1) {  // invariant: at_least(lo) ≥ k > at_least(up)
      const std::uint32_t mid = lo + (up - lo) / 2;
      (at_least(as_float(mid)) >= k ? lo : up) = mid;
    }
    return as_float(lo);
  }

  // Exactly k entries: every one above the k-th largest and, of those equal to it, the first
  // ones in tensor order. Per tensor its sorted flat indices; frees each score tensor.
  std::vector<Tensor> top_k(std::int64_t k) {
    const float lo = kth_largest(k);
    const float above = std::nextafter(lo, std::numeric_limits<float>::infinity());
    std::int64_t ties = k - at_least(above);
    std::vector<Tensor> out;
    for (auto& f : s_) {
      const Tensor flat = f.reshape({-1});
      Tensor idx = flat.ge(above).nonzero().reshape({-1});
      if (ties > 0) {
        const Tensor eq = flat.eq(lo).nonzero().reshape({-1});
        const auto take = std::min<std::int64_t>(ties, eq.numel());
        idx = std::get<0>(at::sort(at::cat({idx, eq.narrow(0, 0, take)})));
        ties -= take;
      }
      f = Tensor();
      out.push_back(idx);
    }
    return out;
  }

  // Every entry at or above t (ties all kept). Per tensor its flat indices; frees each score.
  std::vector<Tensor> at_or_above(float t) {
    std::vector<Tensor> out;
    for (auto& f : s_) out.push_back(f.reshape({-1}).ge(t).nonzero().reshape({-1})), f = Tensor();
    return out;
  }

 private:
  static float as_float(std::uint32_t b) {
    float f;
    std::memcpy(&f, &b, sizeof f);
    return f;
  }
  std::vector<Tensor>& s_;
  std::int64_t total_ = 0;
  double hi_ = 0;
};

}  // namespace tessera
