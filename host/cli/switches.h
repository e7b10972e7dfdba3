// `--disable NAME` and `--scale NAME=F` of `tessera eval` and `generate`: switch off, or
// weigh, a method instance or every instance of a composition group before running.
#pragma once

#include "runtime/method_stack.h"

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

namespace tessera {

struct Switches {
  std::vector<std::string> disable, scale;
  bool any() const { return !disable.empty() || !scale.empty(); }
  void add_options(CLI::App& c);
  // Refuses an unknown name (listing the run's) and a --scale that is not NAME=number.
  void apply(MethodStack& methods) const;
};

}  // namespace tessera
