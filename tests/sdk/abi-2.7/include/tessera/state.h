// Loading a method's state when the file must hold exactly the tensors state() returns:
// the same names and shapes, nothing more, nothing less. Header-only (no library symbol),
// so any 2.x plugin may use it.
#pragma once

#include <tessera/method.h>

#include <ATen/core/grad_mode.h>
#include <c10/util/StringUtil.h>

#include <stdexcept>
#include <string>

namespace tessera {

// Copies `given` into `ours` (state()'s tensors, updated in place) or throws naming the first
// tensor that is foreign ("is not part of <what>: an adapter of another method or layer
// count"), misshapen ("… expected …, (<shape_hint>)") or missing.
inline void load_exact(NamedTensors ours, const NamedTensors& given, const std::string& what, const std::string& shape_hint) {
  for (const auto& [k, t] : given) {
    const auto it = ours.find(k);
    if (it == ours.end()) throw std::runtime_error("tensor '" + k + "' is not part of " + what + ": an adapter of another method or layer count");
    if (t.sizes() != it->second.sizes())
      throw std::runtime_error("tensor '" + k + "' has shape " + c10::str(t.sizes()) + ", expected " + c10::str(it->second.sizes()) + " (" + shape_hint + ")");
  }
  for (const auto& [k, t] : ours)
    if (!given.count(k)) throw std::runtime_error("adapter lacks tensor '" + k + "'");
  at::NoGradGuard no_grad;
  for (auto& [k, t] : ours) t.copy_(given.at(k));
}

}  // namespace tessera
