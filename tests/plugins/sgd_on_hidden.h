// A shared step of the reparameterized plugins' tests (LoHa, VeRA): an adapter trained a
// little by Tessera, to be written out and read by peft.
#pragma once

#include "support.h"

namespace tessera::test {

// Three SGD steps of `inst`'s trainables on a fixed random direction of an encoder's hidden
// states: values the method's own training reached, not an init or a fixture's.
inline void sgd_on_hidden(BertModel& model, MethodInstance& inst, const Tensor& ids, const Tensor& mask, double lr) {
  auto trainable = inst.call("trainable", [](Method& m) { return m.trainable(); });
  at::manual_seed(5);
  const Tensor direction = at::randn({ids.size(0), ids.size(1), model.config().hidden_size}, test::options());
  for (int step = 0; step < 3; ++step) {
    (model.forward(ids, mask).hidden * direction).sum().backward();
    at::NoGradGuard no_grad;
    for (auto& [k, t] : trainable) t.sub_(t.grad() * lr), t.mutable_grad().zero_();
  }
}

}  // namespace tessera::test
