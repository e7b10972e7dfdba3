// Composition groups: [[groups]] in a config arrange method instances beyond config order
// (docs/composing.md is the user's guide). This file checks them and plans what each
// instance becomes; runtime/composition.h makes the plan happen on a model.
//
//   [[groups]]
//   name    = "unipelt"
//   kind    = "gated"                       # stack | parallel | average | gated | route
//   members = ["lora", "prefix", "adapter"] # method instances or other groups
//   weights = [1.0, 3.0]                    # average only: one per member
//   normalize = true                        # average only: weights divided by their sum
//   tag     = "adapter"                     # route only: the [data] tag column
//
// At a site, contributions that add (branches, deltas, parallel modules) add whatever the
// grouping; the kinds differ where contributions chain (sequential modules, weight and
// output transforms) and in how much of each counts:
//   stack     members in this order, each chained one reading what the one before gave
//   parallel  members read the same input; their changes add: h + Σ (m_k(h) − h)
//   average   as parallel, member k's change weighed w_k (/ Σ w)
//   gated     as parallel, member k's change weighed at each site by a learned gate
//             σ(W_g x) from what it reads, averaged over the sequence (UniPELT's)
//   route     each sample gets the change of the member its tag names and no other's
#pragma once

#include "runtime/config.h"

#include <map>
#include <string>
#include <vector>

namespace tessera {

// The nesting table: may a group of kind `child` be a member of one of kind `parent`?
// A stack inside parallel, average or gated would chain its members while the outer group
// reads one input for all of them: refused (put the other group inside the stack). A route
// gives each sample one member, so anything may sit inside it.
bool nesting_allowed(const std::string& parent, const std::string& child);
const std::vector<std::string>& group_kinds();

// Refuses, with file:line:column and before the model is touched: an unknown kind; a
// group named like a method or another group; an unknown member, or one listed twice or
// in two groups; a cycle; a nesting not in the table, or a stack below a parallel, average
// or gated group at any depth (through routes); weights outside average, of the
// wrong count, negative or summing to zero; a route without a tag, or with a tag that is
// not one of [data] tag_columns.
void check_groups(const Config& config);

// The order instances attach in (indices into config.methods): the config's, except that
// each top-level group's instances come together, in the group's member order, where the
// first of them stood.
std::vector<std::size_t> attach_order(const Config& config);

// What the groups make of one instance.
struct Placement {
  double alpha = 1.0;              // the product of the average weights on its way up
  int parallel_group = 0;          // instances with the same non-zero id read one input (OwnerImpl)
  std::vector<std::string> path;   // the groups it is in, innermost first
};
// By instance name; an instance in no group gets the default.
std::map<std::string, Placement> placements(const Config& config);

// The group named `name` (null: none).
const GroupConfig* find_group(const Config& config, const std::string& name);

}  // namespace tessera
