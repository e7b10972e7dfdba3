// A check the reparameterized plugins' tests share (LoHa, LoKr, KronA, VeRA): the gradients
// of every trained tensor equal peft's for the same adapter, inputs and loss.
#pragma once

#include "support.h"

namespace tessera::test {

// make_fixtures.py's peft_reference(variant, …, grads=True) wrote ref[variant + ".grad.<key>"]:
// peft's gradient of Σ hidden ⊙ grad.direction ⊙ mask under each key of its saved file. `inst`
// holds that adapter (attach_peft_adapter) on `model`; ours must be defined for exactly those
// keys and equal each within float32's rounding of the backward pass.
inline void check_gradient_parity(MethodInstance& inst, BertModel& model, NamedTensors& ref, const std::string& variant) {
  const Tensor& mask = ref["attention_mask"];
  (model.forward(ref["input_ids"], mask).hidden * ref["grad.direction"] * mask.unsqueeze(-1)).sum().backward();
  const std::string prefix = variant + ".grad.";
  std::size_t compared = 0, ours_with_grad = 0;
  for (const auto& [k, t] : inst.call("state", [](Method& m) { return m.state(); })) {
    if (!t.grad().defined()) continue;
    ++ours_with_grad;
    CATCH_INFO(k);
    const auto it = ref.find(prefix + k);
    CATCH_REQUIRE(it != ref.end());  // no gradient where peft has none (VeRA's shared matrices are frozen)
    const Tensor theirs = it->second.to(at::kDouble);
    const double err = (t.grad().to(at::kCPU, at::kDouble) - theirs).abs().max().item<double>() / theirs.abs().max().item<double>();
    CATCH_CHECK(err < 2e-3);
    ++compared;
    t.mutable_grad().reset();
  }
  std::size_t theirs = 0;
  for (const auto& [k, _] : ref) theirs += k.rfind(prefix, 0) == 0;
  CATCH_CHECK(compared == theirs);
  CATCH_CHECK(ours_with_grad > 0);
}

}  // namespace tessera::test
