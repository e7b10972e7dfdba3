// The composition groups of a run made real on a model (the plan is runtime/groups.h's):
// each attached instance's owner gets its α (average weights), its parallel group, and
// the factors its groups multiply its contributions by — a route group's sample mask, a
// gated group's learned gates. The gates are trainable tensors of the run, saved beside
// the instances' states.
#pragma once

#include "architectures/site_model.h"
#include "runtime/config.h"

#include <tessera/method.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

class OwnerImpl;

class Composition {
 public:
  // owners: every attached instance's owner by instance name; `groups` passed check_groups.
  Composition(const std::vector<MethodConfig>& methods, const std::vector<GroupConfig>& groups,
              const std::map<std::string, OwnerImpl*>& owners, SiteModel& model);
  ~Composition();

  // The gates' tensors, "<group>.<instance>.<site>.weight" / ".bias" ((1, F) and (1)) and
  // ".scalar" (a parameter site's: ()); empty without gated groups.
  NamedTensors trainable() const;
  void load_state(const NamedTensors& state);  // refuses a missing or misshapen tensor, naming it
  // Whether instance `name` sits in a gated or route group (its effect differs by sample:
  // it cannot be folded into the weights): that group's name, or "".
  std::string sample_dependent_group(const std::string& name) const;

 private:
  std::shared_ptr<class GateBank> bank_;  // the gates at linear sites, computed per input
  std::vector<std::shared_ptr<const class GateSet>> gates_;
  std::map<std::string, std::string> sample_dependent_;
};

// `tessera eval` / `generate` --disable NAME and --scale NAME=F: an instance, or every
// instance in a group. Refuses an unknown name, listing the known ones.
void disable_named(const std::string& name, const std::vector<MethodConfig>& methods, const std::vector<GroupConfig>& groups,
                   const std::map<std::string, OwnerImpl*>& owners);
void rescale_named(const std::string& name, double factor, const std::vector<MethodConfig>& methods, const std::vector<GroupConfig>& groups,
                   const std::map<std::string, OwnerImpl*>& owners);

}  // namespace tessera
