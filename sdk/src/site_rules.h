// What every site kind's execution shares inside the SDK library (not installed): owner
// bookkeeping over a site's lists, the host's weights (α, per-token and per-sample factors),
// refusals of what cannot be weighed, taps, and chaining. Split out so that each file of
// sdk/src holds a few site kinds; see tessera/sites.h for the order they implement.
#pragma once

#include <tessera/internal/sites_impl.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <stdexcept>

namespace tessera::site_rules {

template <class Fn>
void erase_owner(Entries<Fn>& list, const OwnerImpl& owner) {
  list.erase(std::remove_if(list.begin(), list.end(), [&](const auto& e) { return e.owner.get() == &owner; }), list.end());
}

template <class Fn>
bool any_on(const Entries<Fn>& list) {
  return std::any_of(list.begin(), list.end(), [](const auto& e) { return e.on(); });
}

template <class Fn>
bool owns(const Entries<Fn>& list, const OwnerImpl& owner) {
  return std::any_of(list.begin(), list.end(), [&](const auto& e) { return e.owner.get() == &owner; });
}
// The names of the kinds an owner has, from (has it, name) pairs.
inline std::vector<std::string> present(std::initializer_list<std::pair<bool, const char*>> kinds) {
  std::vector<std::string> out;
  for (const auto& [has, name] : kinds)
    if (has) out.emplace_back(name);
  return out;
}

// How much of one contribution counts: the owner's α times its groups' factors (f undefined:
// none). At α = 1 without factors nothing is multiplied (the method's own numbers, bit for bit).
struct Weight {
  double alpha = 1.0;
  Tensor f;
  bool one() const { return alpha == 1.0 && !f.defined(); }
};

inline Tensor times(const Weight& w, Tensor t) {
  if (w.alpha != 1.0) t = t * w.alpha;
  return w.f.defined() ? t * w.f : t;
}
// y + w·t. A per-row factor joins the sum in one pass (addcmul) rather than as its own
// product the size of t: a gated branch's output is (N, out) rows.
inline Tensor plus(const Tensor& y, const Weight& w, const Tensor& t) {
  if (!w.f.defined()) return y + (w.alpha != 1.0 ? t * w.alpha : t);
  Tensor f = w.f.scalar_type() == t.scalar_type() ? w.f : w.f.to(t.scalar_type());
  return at::addcmul(y, t, w.alpha != 1.0 ? f * w.alpha : f);
}
// 1 + w(s − 1): a multiplicative intervention moved from the identity toward s.
inline Tensor toward(const Weight& w, const Tensor& s) { return w.one() ? s : times(w, s - 1) + 1; }

inline Tensor product(const Tensor& a, const Tensor& b) { return a.defined() ? a * b : b; }

// For a contribution shaped like x's rows, x being what it reads.
template <class Fn>
Weight per_token(const Entry<Fn>& e, const SiteCore& site, const Tensor& x) {
  Weight w{e.alpha()};
  for (const auto& f : e.owner->factors()) w.f = product(w.f, f->per_token(site.site_name(), x));
  return w;
}
// What a row-scaled branch of `owner` is handed for x (SDK 2.8): α times its groups' per-token
// factors, undefined without factors (α then weighs the branch's output, as any contribution's).
inline Tensor row_weight(const OwnerImpl& owner, const SiteCore& site, const Tensor& x) {
  Tensor f;
  for (const auto& factor : owner.factors()) f = product(f, factor->per_token(site.site_name(), x));
  if (!f.defined() || owner.scale() == 1.0) return f;
  return f * owner.scale();
}
// For a parameter delta: scalars.
template <class Fn>
Weight per_tensor(const Entry<Fn>& e, const SiteCore& site) {
  Weight w{e.alpha()};
  for (const auto& f : e.owner->factors()) w.f = product(w.f, f->scalar(site.site_name()));
  return w;
}
// For a prefix's keys and values (B, heads, P, d): (B, 1, 1, 1) each, undefined without factors.
template <class Fn>
std::pair<Tensor, Tensor> kv_factors(const Entry<Fn>& e, const SiteCore& site, const Tensor& x, std::int64_t batch) {
  Tensor fk, fv;
  for (const auto& f : e.owner->factors()) {
    if (!f->weighs_prefixes())
      throw InterventionError(e.owner->where(site.site_name()) + "a route group cannot route a prefix: its keys would still take part in every sample's attention");
    const Tensor t = f->per_sample(site.site_name(), x, batch);  // (B), or (B, 2): keys', values'
    fk = product(fk, t.dim() == 2 ? t.select(1, 0) : t);
    fv = product(fv, t.dim() == 2 ? t.select(1, 1) : t);
  }
  if (fk.defined()) fk = fk.reshape({batch, 1, 1, 1}), fv = fv.reshape({batch, 1, 1, 1});
  return {fk, fv};
}
// What changes a shape or a path (a prompt, a tap, a router) has no magnitude to weigh.
template <class Fn>
void refuse_factors(const Entry<Fn>& e, const SiteCore& site, const char* what) {
  if (!e.owner->factors().empty())
    throw InterventionError(e.owner->where(site.site_name()) + "is in a gated or routed group, but " + what +
                            " cannot be weighed per sample or per token (put the instance outside the group)");
}

// Shows x, detached, to every tap that is on (taps read; they never change the forward).
inline void show(const Entries<HiddenTap>& taps, const SiteCore& site, const Tensor& x) {
  for (const auto& t : taps)
    if (t.on()) {
      refuse_factors(t, site, "a tap");
      site.call(t, x.detach());
    }
}

// Runs interventions that chain (each reads what the one before gave) over v in install
// order: v ↦ v + w(run(v) − v). Owners of one parallel group (composition) all read the
// value before the first of them, and their changes add up.
// An owner with two such interventions at one site chains them on its own outputs: its
// second reads its first's output, and its changes add up to w(out₂ − base).
template <class Fn, class Run, class Weigh>
Tensor chain(const Entries<Fn>& list, Tensor v, const Run& run, const Weigh& weigh) {
  Tensor base = v, own;
  int group = 0;
  const OwnerImpl* last = nullptr;
  for (const auto& e : list) {
    if (!e.on()) continue;
    const int g = e.owner->parallel_group();
    const bool joins = g != 0 && g == group;
    const bool again = joins && e.owner.get() == last;
    group = g, last = e.owner.get();
    if (!joins) base = v;
    const Tensor in = again ? own : base;
    const Tensor out = run(e, in);
    const Weight w = weigh(e, in);
    if (joins)
      v = v + times(w, out - in);
    else
      v = w.one() ? out : base + times(w, out - base);
    own = out;
  }
  return v;
}

}  // namespace tessera::site_rules
