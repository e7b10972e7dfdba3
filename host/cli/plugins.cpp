// `tessera plugins`: the plugins found, their parameters, and the files refused and why.
#include "cli/commands.h"

#include <iostream>
#include <sstream>

namespace tessera {
namespace {

std::string number(double x) {
  std::ostringstream o;
  o << x;
  return o.str();
}

void print_parameter(const ParamSpec& s) {
  std::cout << "    " << s.name << " (" << to_string(s.type) << ", default " << format_value(s.default_value);
  if (s.min || s.max) std::cout << ", range [" << (s.min ? number(*s.min) : "-inf") << ", " << (s.max ? number(*s.max) : "inf") << "]";
  if (!s.choices.empty()) {
    std::cout << ", one of";
    for (const auto& c : s.choices) std::cout << " " << c;
  }
  std::cout << ")\n        " << s.doc << "\n";
}

int print_plugins(const PluginRegistry& reg) {
  std::cout << reg.plugins().size() << " plugin(s) found\n";
  for (const auto& p : reg.plugins()) {
    std::cout << "\n" << p.id << " " << p.version << "  [" << p.family << ", SDK " << TESSERA_SDK_ABI_MAJOR << "." << p.abi_minor << "]  " << p.summary << "\n"
              << "  paper: " << p.paper << "\n  file:  " << p.path << "\n  parameters:\n";
    for (const auto& s : p.params) print_parameter(s);
  }
  if (!reg.refused().empty()) {
    std::cout << "\n" << reg.refused().size() << " refused:\n";
    for (const auto& r : reg.refused()) std::cout << "  " << r.path << ": " << r.reason << "\n";
  }
  return 0;
}

}  // namespace

Command plugins_command() { return {"plugins", "list the plugins found and the ones refused", [](CLI::App&) {}, print_plugins}; }

}  // namespace tessera
