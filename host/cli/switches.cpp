#include "cli/switches.h"

#include <cmath>
#include <stdexcept>

namespace tessera {

void Switches::add_options(CLI::App& c) {
  c.add_option("--disable", disable, "switch off a method instance, or every instance of a group (repeatable)")->allow_extra_args(false);  // one name per flag: a prompt after it stays the prompt
  c.add_option("--scale", scale, "NAME=F: multiply how much an instance's (or a group's instances') contributions count (repeatable)")
      ->allow_extra_args(false);
}

void Switches::apply(MethodStack& methods) const {
  for (const auto& name : disable) methods.disable(name);
  for (const auto& s : scale) {
    const auto eq = s.rfind('=');
    double f = 0;
    std::size_t used = 0;
    try {
      if (eq != std::string::npos && eq > 0) f = std::stod(s.substr(eq + 1), &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (eq == std::string::npos || eq == 0 || used == 0 || used != s.size() - eq - 1 || !std::isfinite(f))
      throw std::runtime_error("--scale " + s + ": write NAME=F, F a finite number (--scale lora=0.5)");
    methods.rescale(s.substr(0, eq), f);
  }
}

}  // namespace tessera
