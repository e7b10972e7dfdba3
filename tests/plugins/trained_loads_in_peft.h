// A check the reparameterized plugins' tests share (LoHa, VeRA, PiSSA): an adapter trained a
// little by Tessera, written in peft's layout, loads in PeftModel.from_pretrained with our
// outputs.
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

// `plugin` with `settings` on MiniLM's `targets`, trained by sgd_on_hidden at `lr`: its outputs
// are off the base model's, and peft, given the folder Tessera writes, computes the same.
inline void check_trained_loads_in_peft(const std::string& plugin, const std::vector<std::string>& targets,
                                        std::map<std::string, ParamValue> settings, double lr) {
  auto ref = read_tensors(fixture("reference.safetensors"));
  const Tensor ids = ref["input_ids"], mask = ref["attention_mask"];
  auto model = load_minilm();
  auto inst = registry().create(plugin, plugin);
  inst->attach(*model, targets, apply_schema(registry().find(plugin)->params, std::move(settings)));
  sgd_on_hidden(*model, *inst, ids, mask, lr);
  at::NoGradGuard no_grad;
  const Tensor ours = model->forward(ids, mask).hidden;
  CATCH_CHECK(max_abs_diff_tokens(ours, ref["hidden"], mask) > 1e-3);  // training moved it off the base
  TESSERA_CHECK_PARITY(parity(ours, peft_outputs(*inst, "encoder", model_dir(), fixture("reference.safetensors")), "out", mask));
}

}  // namespace tessera::test
