#include "runtime/groups.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

namespace tessera {
namespace {

bool is_parallel_kind(const std::string& kind) { return kind == "parallel" || kind == "average" || kind == "gated"; }

std::map<std::string, std::size_t> method_index(const Config& c) {
  std::map<std::string, std::size_t> out;
  for (std::size_t i = 0; i < c.methods.size(); ++i) out[c.methods[i].name] = i;
  return out;
}

// member -> the group it is in
std::map<std::string, const GroupConfig*> parents(const Config& c) {
  std::map<std::string, const GroupConfig*> out;
  for (const auto& g : c.groups)
    for (const auto& m : g.members) out.emplace(m, &g);
  return out;
}

void check_members(const Config& c, const GroupConfig& g, std::map<std::string, const GroupConfig*>& seen) {
  const auto methods = method_index(c);
  std::vector<std::string> names;
  for (const auto& m : c.methods) names.push_back(m.name);
  for (const auto& other : c.groups) names.push_back(other.name);
  if (g.members.empty()) throw ConfigError(g.at("members"), "group '" + g.name + "' needs 'members': method instances or groups");
  for (std::size_t i = 0; i < g.members.size(); ++i) {
    const std::string& m = g.members[i];
    const SourcePos& at = i < g.member_pos.size() ? g.member_pos[i] : g.at("members");
    if (!methods.count(m) && find_group(c, m) == nullptr) {
      const std::string hint = nearest(m, names);
      throw ConfigError(at, "group '" + g.name + "': no method instance or group is named '" + m + "'" + (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
    }
    if (m == g.name) throw ConfigError(at, "group '" + g.name + "' lists itself");
    const auto [it, fresh] = seen.emplace(m, &g);
    if (!fresh)
      throw ConfigError(at, "'" + m + "' is listed " + (it->second == &g ? "twice in group '" + g.name + "'" : "in groups '" + it->second->name + "' and '" + g.name + "'") +
                                ": an instance or group belongs to one group, once");
    if (const GroupConfig* inner = find_group(c, m); inner != nullptr && !nesting_allowed(g.kind, inner->kind))
      throw ConfigError(at, "group '" + g.name + "' (" + g.kind + ") cannot hold group '" + m + "' (" + inner->kind +
                                "): a stack inside a parallel, average or gated group would chain what the group reads at once; put the " + g.kind +
                                " group inside the stack instead (docs/composing.md, nesting)");
  }
}

void check_keys(const Config& c, const GroupConfig& g) {
  if (!g.weights.empty() && g.kind != "average") throw ConfigError(g.at("weights"), "group '" + g.name + "': 'weights' belong to an average group");
  if (g.key_pos.count("normalize") && g.kind != "average") throw ConfigError(g.at("normalize"), "group '" + g.name + "': 'normalize' belongs to an average group");
  if (!g.weights.empty()) {
    if (g.weights.size() != g.members.size())
      throw ConfigError(g.at("weights"), "group '" + g.name + "' has " + std::to_string(g.weights.size()) + " weights for " + std::to_string(g.members.size()) + " members");
    double sum = 0;
    for (double w : g.weights) {
      if (!std::isfinite(w) || w < 0) throw ConfigError(g.at("weights"), "group '" + g.name + "': weights must be finite and not negative");
      sum += w;
    }
    if (g.normalize && sum <= 0) throw ConfigError(g.at("weights"), "group '" + g.name + "': the weights sum to 0, so they cannot be normalised");
  }
  if (g.kind == "route") {
    if (g.tag.empty()) throw ConfigError(g.pos, "route group '" + g.name + "' needs 'tag': the [data] tag column whose value names each sample's member");
    const auto& cols = c.data.tag_columns;
    if (std::find(cols.begin(), cols.end(), g.tag) == cols.end())
      throw ConfigError(g.at("tag"), "route group '" + g.name + "': tag '" + g.tag + "' is not one of [data] tag_columns (add it there)");
  } else if (!g.tag.empty()) {
    throw ConfigError(g.at("tag"), "group '" + g.name + "': 'tag' belongs to a route group");
  }
}

// Depth-first from each group; a group met again on the current path is a cycle.
void check_cycles(const Config& c) {
  std::set<std::string> done;
  std::vector<std::string> path;
  std::function<void(const GroupConfig&)> visit = [&](const GroupConfig& g) {
    if (std::find(path.begin(), path.end(), g.name) != path.end()) {
      std::string chain;
      for (const auto& p : path) chain += p + " -> ";
      throw ConfigError(g.pos, "groups form a cycle: " + chain + g.name);
    }
    if (done.count(g.name)) return;
    path.push_back(g.name);
    for (const auto& m : g.members)
      if (const GroupConfig* inner = find_group(c, m)) visit(*inner);
    path.pop_back();
    done.insert(g.name);
  };
  for (const auto& g : c.groups) visit(g);
}

// A stack below a parallel, average or gated group at any depth (through route groups,
// which the table allows) would be flattened: its members would read the outer group's input.
void check_deep_stacks(const Config& c) {
  const auto parent = parents(c);
  for (const auto& g : c.groups) {
    if (g.kind != "stack") continue;
    const auto direct = parent.find(g.name);
    if (direct == parent.end()) continue;
    for (auto it = direct; it != parent.end(); it = parent.find(it->second->name)) {
      if (!is_parallel_kind(it->second->kind)) continue;
      const GroupConfig& in = *direct->second;
      const auto k = static_cast<std::size_t>(std::find(in.members.begin(), in.members.end(), g.name) - in.members.begin());
      throw ConfigError(k < in.member_pos.size() ? in.member_pos[k] : in.pos,
                        "stack group '" + g.name + "' sits inside " + it->second->kind + " group '" + it->second->name +
                            "' (through '" + in.name + "'): its members would read the " + it->second->kind +
                            " group's input instead of each other's output; put that group inside the stack instead");
    }
  }
}

}  // namespace

const std::vector<std::string>& group_kinds() {
  static const std::vector<std::string> kinds = {"stack", "parallel", "average", "gated", "route"};
  return kinds;
}

bool nesting_allowed(const std::string& parent, const std::string& child) {
  if (parent == "stack" || parent == "route") return true;
  return child != "stack";  // parallel, average, gated: anything that reads one input as they do
}

const GroupConfig* find_group(const Config& config, const std::string& name) {
  for (const auto& g : config.groups)
    if (g.name == name) return &g;
  return nullptr;
}

void check_groups(const Config& c) {
  std::set<std::string> names;
  for (const auto& m : c.methods) names.insert(m.name);
  for (const auto& g : c.groups) {
    const auto& kinds = group_kinds();
    if (std::find(kinds.begin(), kinds.end(), g.kind) == kinds.end()) {
      const std::string hint = nearest(g.kind, kinds);
      throw ConfigError(g.at("kind"), "group '" + g.name + "': kind '" + g.kind + "' is not one of stack, parallel, average, gated, route" +
                                          (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
    }
    if (!names.insert(g.name).second) throw ConfigError(g.at("name"), "the name '" + g.name + "' is taken by a method instance or another group");
  }
  std::map<std::string, const GroupConfig*> seen;
  for (const auto& g : c.groups) {
    check_members(c, g, seen);
    check_keys(c, g);
  }
  check_cycles(c);
  check_deep_stacks(c);
}

std::vector<std::size_t> attach_order(const Config& c) {
  const auto methods = method_index(c);
  const auto parent = parents(c);
  std::vector<std::size_t> order;
  std::set<std::size_t> placed;
  std::function<void(const std::string&)> expand = [&](const std::string& name) {
    if (const auto it = methods.find(name); it != methods.end()) {
      if (placed.insert(it->second).second) order.push_back(it->second);
      return;
    }
    for (const auto& m : find_group(c, name)->members) expand(m);
  };
  for (const auto& m : c.methods) {
    std::string top = m.name;  // the outermost group it is in, or itself
    for (auto it = parent.find(top); it != parent.end(); it = parent.find(top)) top = it->second->name;
    expand(top);
  }
  return order;
}

std::map<std::string, Placement> placements(const Config& c) {
  const auto parent = parents(c);
  std::map<std::string, int> ids;  // outermost parallel-kind group -> its id
  std::map<std::string, Placement> out;
  for (const auto& m : c.methods) {
    Placement p;
    std::string child = m.name;
    std::string outermost_parallel;
    for (auto it = parent.find(child); it != parent.end(); it = parent.find(child)) {
      const GroupConfig& g = *it->second;
      p.path.push_back(g.name);
      if (g.kind == "average" && !g.weights.empty()) {
        const auto k = static_cast<std::size_t>(std::find(g.members.begin(), g.members.end(), child) - g.members.begin());
        double sum = 0;
        for (double w : g.weights) sum += w;
        p.alpha *= g.normalize ? g.weights[k] / sum : g.weights[k];
      } else if (g.kind == "average" && g.normalize) {
        p.alpha /= static_cast<double>(g.members.size());
      }
      if (is_parallel_kind(g.kind)) outermost_parallel = g.name;
      child = g.name;
    }
    if (!outermost_parallel.empty()) p.parallel_group = ids.emplace(outermost_parallel, static_cast<int>(ids.size()) + 1).first->second;
    out[m.name] = std::move(p);
  }
  return out;
}

}  // namespace tessera
