#include "runtime/composition.h"

#include "runtime/gate_bank.h"
#include "runtime/groups.h"

#include <tessera/internal/sites_impl.h>
#include <tessera/sample_mean.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <set>
#include <stdexcept>

namespace tessera {
namespace {

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : ", ") + x;
  return out;
}

// A route group's factor for one member: 1 for the samples whose tag names the member, 0
// for the others. Exact zeros and ones, so that a sample's result is its member's alone.
class RouteMask final : public ContributionFactor {
 public:
  RouteMask(const GroupConfig& g, std::string member, const ModelView& view)
      : group_(g.name), column_(g.tag), member_(std::move(member)), members_(g.members), view_(view) {}

  Tensor per_token(const std::string& site, const Tensor& x) const override {  // x: (B, T, F) or (N, F) unpadded
    const Tensor samples = view_.token_samples();
    if (samples.defined() && x.dim() == 2 && x.size(0) == samples.size(0)) return mask(x).index_select(0, samples).unsqueeze(-1);  // (N, 1)
    const Tensor m = mask(x);
    if (x.dim() < 2 || x.size(0) != m.size(0))
      throw std::runtime_error("route group '" + group_ + "' at site '" + site + "': a contribution shaped " + c10::str(x.sizes()) +
                               " has no sample per row for the batch's " + std::to_string(m.size(0)) + " tags");
    std::vector<std::int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
    shape[0] = m.size(0);
    return m.reshape(shape);  // (B, 1, …, 1)
  }
  Tensor per_sample(const std::string&, const Tensor& x, std::int64_t batch) const override {
    Tensor m = mask(x.defined() ? x : at::empty({0}, view_.info().options));
    if (m.size(0) != batch)
      throw std::runtime_error("route group '" + group_ + "': the batch has " + std::to_string(batch) + " samples but " + std::to_string(m.size(0)) + " tags");
    return m;
  }
  Tensor scalar(const std::string& site) const override {
    throw std::runtime_error("route group '" + group_ + "': member '" + member_ + "' changes the parameter at site '" + site +
                             "', which every sample shares, so it cannot be routed by sample");
  }
  bool weighs_prefixes() const override { return false; }

 private:
  Tensor mask(const Tensor& like) const {  // (B) in like's dtype and device
    const auto tags = view_.sample_tags(column_);
    if (tags.empty())
      throw std::runtime_error("route group '" + group_ + "' reads tag column '" + column_ + "', which this batch does not carry ([data] tag_columns; `tessera generate --tag " +
                               column_ + "=MEMBER`)");
    if (tags == cached_tags_ && cached_.defined() && cached_.device() == like.device() && cached_.scalar_type() == like.scalar_type()) return cached_;
    std::vector<float> m(tags.size());
    for (std::size_t i = 0; i < tags.size(); ++i) {
      if (std::find(members_.begin(), members_.end(), tags[i]) == members_.end())
        throw std::runtime_error("route group '" + group_ + "': sample " + std::to_string(i) + "'s " + column_ + " is '" + tags[i] +
                                 "', which names none of its members (" + joined(members_) + ")");
      m[i] = tags[i] == member_ ? 1.f : 0.f;
    }
    cached_tags_ = tags;
    cached_ = at::tensor(m).to(like.options());
    return cached_;
  }
  std::string group_, column_, member_;
  std::vector<std::string> members_;
  const ModelView& view_;
  mutable std::vector<std::string> cached_tags_;
  mutable Tensor cached_;
};

std::int64_t input_width(SiteCore* site, const SiteModel& model) {
  if (auto* l = dynamic_cast<LinearSiteImpl*>(site)) return l->in_features();
  if (dynamic_cast<ParameterSiteImpl*>(site) != nullptr) return 0;  // a scalar gate
  return model.info().hidden_size;  // sublayer, attention, layer, embedding and output sites read the hidden states
}

// Where `member` is listed in group g, for errors.
SourcePos member_at(const GroupConfig& g, const std::string& member) {
  for (std::size_t i = 0; i < g.members.size() && i < g.member_pos.size(); ++i)
    if (g.members[i] == member) return g.member_pos[i];
  return g.at("members");
}

// The member of group `gname` that instance `name` stands under (the instance itself or the
// group below `gname` on its way up); empty when it is not in that group.
std::string member_under(const std::string& name, const Placement& p, const std::string& gname) {
  std::string member = name;
  for (const auto& g : p.path) {
    if (g == gname) return member;
    member = g;
  }
  return "";
}

// What a group cannot weigh, route or add, refused once its members have attached — before
// the first forward pass, at the member's place in the config (the sites refuse it again in
// the forward pass, for a model changed after this check).
void check_members(const Config& c, const std::map<std::string, Placement>& plan, const std::map<std::string, OwnerImpl*>& owners) {
  static const std::set<std::string> unweighable = {"a prompt", "a tap", "an input tap", "a token router", "a weight transform", "a score hook"};
  static const std::set<std::string> replacing = {"an output transform", "an embedding transform"};  // they replace a site's states
  static const std::set<std::string> unroutable = {"a prefix", "an input prefix", "a parameter delta", "a sparse parameter delta"};
  for (const auto& g : c.groups) {
    std::map<SiteCore*, std::string> replaced;  // site -> the member whose output or embedding transform replaces it
    for (const auto& [name, owner] : owners) {
      const auto it = plan.find(name);
      const std::string member = it == plan.end() ? "" : member_under(name, it->second, g.name);
      if (member.empty()) continue;
      std::map<std::string, SiteCore*> by_name;  // named in the sites' name order, not their addresses'
      for (SiteCore* site : owner->sites()) by_name[site->site_name()] = site;
      for (const auto& [_, site] : by_name)
        for (const auto& kind : site->kinds(*owner)) {
          const bool weighs = g.kind == "gated" || g.kind == "route";
          if ((weighs && unweighable.count(kind)) || (g.kind == "route" && unroutable.count(kind)))
            throw ConfigError(member_at(g, member), "group '" + g.name + "' (" + g.kind + "): instance '" + name + "' installs " + kind + " at site '" + site->site_name() +
                                                        "', which cannot be " + (g.kind == "route" ? "routed by sample" : "weighed per sample or per token") +
                                                        " (put the instance outside the group)");
          if (!replacing.count(kind) || (g.kind != "parallel" && g.kind != "gated")) continue;
          const auto [at, fresh] = replaced.emplace(site, member);
          if (!fresh && at->second != member)
            throw ConfigError(member_at(g, member), "group '" + g.name + "' (" + g.kind + ") adds its members' changes, but '" + at->second + "' and '" + member +
                                                        "' both replace the hidden states at site '" + site->site_name() + "' (" + kind +
                                                        "): their sum is neither's (an average group takes their mean)");
        }
    }
  }
}

}  // namespace

// A gated group's gates for one member: at each site it has interventions on, σ(x W_gᵀ + b)
// from what the contribution reads, averaged over the sample's real tokens — one gate per
// sample, as UniPELT (and AdapterHub's use_gating) computes it, in either layout the host
// runs (tessera/sample_mean.h); a parameter site's is σ(s), a learned scalar. A linear site's
// gate is a column of the run's GateBank, computed with every gate that reads the same input.
class GateSet final : public ContributionFactor {
 public:
  GateSet(const GroupConfig& g, std::string member, const OwnerImpl& owner, const SiteModel& model, std::shared_ptr<GateBank> bank)
      : prefix_(g.name + "." + member + "."), model_(model), bank_(std::move(bank)) {
    const auto opts = model.info().param_options;
    std::map<std::string, SiteCore*> by_name;  // drawn in name order, not in the sites' address order
    for (SiteCore* site : owner.sites()) by_name[site->site_name()] = site;
    for (const auto& [_, site] : by_name) {
      const std::int64_t width = input_width(site, model);
      Gate gate;
      if (width == 0) {
        gate.scalar = at::zeros({}, opts).requires_grad_(true);
      } else {
        gate.weight = (at::randn({1, width}, opts) * 0.02).requires_grad_(true);  // AdapterHub's init: N(0, 0.02²)
        gate.bias = at::zeros({1}, opts).requires_grad_(true);
        if (auto* linear = dynamic_cast<LinearSiteImpl*>(site)) gate.input = linear->input_group(), gate.column = bank_->add(gate.input, gate.weight, gate.bias);
      }
      gates_[site->site_name()] = gate;
    }
  }

  Tensor per_token(const std::string& site, const Tensor& x) const override {  // x: (B, T, F) or (N, F) unpadded -> (B, 1, 1) or (N, 1)
    const Gate& g = at_site(site);
    if (g.column >= 0 && (x.dim() == 2 || x.dim() == 3)) return bank_->gate(g.input, g.column, x);
    return mean_over_tokens_per_row(model_, sigmoid(site, x));
  }
  Tensor per_sample(const std::string& site, const Tensor& x, std::int64_t) const override {
    if (!x.defined())
      throw std::runtime_error("gate " + prefix_ + site + ": this site's contribution (an input-free prefix) is made before the layer's input exists, so it cannot be gated yet");
    return mean_over_tokens(model_, sigmoid(site, x)).reshape({-1});  // (B)
  }
  Tensor scalar(const std::string& site) const override { return at::sigmoid(at_site(site).scalar); }

  void collect(NamedTensors& out) const {
    for (const auto& [site, g] : gates_) {
      if (g.scalar.defined()) out[prefix_ + site + ".scalar"] = g.scalar;
      else out[prefix_ + site + ".weight"] = g.weight, out[prefix_ + site + ".bias"] = g.bias;
    }
  }

 private:
  struct Gate {
    Tensor weight, bias, scalar;
    std::string input;         // a linear site's input group, whose GateBank entry holds it
    std::int64_t column = -1;  // its column there; -1: computed alone
  };
  Tensor sigmoid(const std::string& site, const Tensor& x) const {  // x: (..., F) -> σ(x W_gᵀ + b) (..., 1)
    const Gate& g = at_site(site);
    if (x.dim() != 2 && x.dim() != 3) throw std::runtime_error("gate " + prefix_ + site + " reads " + c10::str(x.sizes()) + ", not a batch's tokens");
    return at::sigmoid(at::linear(x, g.weight.to(x.scalar_type()), g.bias.to(x.scalar_type())));
  }
  const Gate& at_site(const std::string& site) const {
    const auto it = gates_.find(site);
    if (it == gates_.end()) throw std::runtime_error("gate " + prefix_ + site + ": the member had no intervention at this site when the group was made");
    return it->second;
  }
  std::string prefix_;
  const SiteModel& model_;
  std::shared_ptr<GateBank> bank_;  // shared by every gated member of the run
  std::map<std::string, Gate> gates_;
};

Composition::Composition(const std::vector<MethodConfig>& methods, const std::vector<GroupConfig>& groups,
                         const std::map<std::string, OwnerImpl*>& owners, SiteModel& model)
    : bank_(std::make_shared<GateBank>(model)) {
  Config c;
  c.methods = methods;
  c.groups = groups;
  const auto plan = placements(c);
  check_members(c, plan, owners);
  for (const auto& [name, owner] : owners) {
    const auto it = plan.find(name);
    if (it == plan.end()) continue;
    const Placement& p = it->second;
    owner->set_scale(p.alpha);
    owner->set_parallel_group(p.parallel_group);
    std::vector<std::shared_ptr<const ContributionFactor>> factors;
    std::string member = name;
    for (const auto& gname : p.path) {  // innermost first: the member each group sees
      const GroupConfig& g = *find_group(c, gname);
      if (g.kind == "route") {
        factors.push_back(std::make_shared<RouteMask>(g, member, model));
        sample_dependent_.emplace(name, g.name);
      } else if (g.kind == "gated") {
        auto gates = std::make_shared<GateSet>(g, name, *owner, model, bank_);
        gates_.push_back(gates);
        factors.push_back(gates);
        sample_dependent_.emplace(name, g.name);
      }
      member = gname;
    }
    owner->set_factors(std::move(factors));
  }
}

Composition::~Composition() = default;

NamedTensors Composition::trainable() const {
  NamedTensors out;
  for (const auto& g : gates_) g->collect(out);
  return out;
}

void Composition::load_state(const NamedTensors& state) {
  at::NoGradGuard no_grad;
  for (auto& [name, t] : trainable()) {
    const auto it = state.find(name);
    if (it == state.end()) throw std::runtime_error("composition state: tensor '" + name + "' is missing");
    if (it->second.sizes() != t.sizes())
      throw std::runtime_error("composition state: tensor '" + name + "' is " + c10::str(it->second.sizes()) + ", not " + c10::str(t.sizes()));
    Tensor dst = t;
    dst.copy_(it->second);
  }
}

std::string Composition::sample_dependent_group(const std::string& name) const {
  const auto it = sample_dependent_.find(name);
  return it == sample_dependent_.end() ? "" : it->second;
}

namespace {

// The owners an instance or group name stands for.
std::vector<OwnerImpl*> named(const std::string& name, const std::vector<MethodConfig>& methods, const std::vector<GroupConfig>& groups,
                              const std::map<std::string, OwnerImpl*>& owners) {
  if (const auto it = owners.find(name); it != owners.end()) return {it->second};
  Config c;
  c.methods = methods;
  c.groups = groups;
  if (find_group(c, name) != nullptr) {
    std::vector<OwnerImpl*> out;
    for (const auto& [instance, p] : placements(c))
      if (std::find(p.path.begin(), p.path.end(), name) != p.path.end() && owners.count(instance)) out.push_back(owners.at(instance));
    return out;
  }
  std::vector<std::string> known;
  for (const auto& [n, _] : owners) known.push_back(n);
  for (const auto& g : groups) known.push_back(g.name);
  throw std::runtime_error("no method instance or group is named '" + name + "' (the run has: " + joined(known) + ")");
}

}  // namespace

void disable_named(const std::string& name, const std::vector<MethodConfig>& methods, const std::vector<GroupConfig>& groups,
                   const std::map<std::string, OwnerImpl*>& owners) {
  for (auto* o : named(name, methods, groups, owners)) o->set_enabled(false);
}

void rescale_named(const std::string& name, double factor, const std::vector<MethodConfig>& methods, const std::vector<GroupConfig>& groups,
                   const std::map<std::string, OwnerImpl*>& owners) {
  for (auto* o : named(name, methods, groups, owners)) o->set_scale(o->scale() * factor);
}

}  // namespace tessera
